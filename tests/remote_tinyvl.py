"""A tiny remote-code VLM, written by the tests themselves (no hub): a folder with
`config.json` whose `auto_map` points at `configuration_tinyvl.py` / `modeling_tinyvl.py`
beside it, safetensors weights, and a processor.

The model is shaped like InternVL's remote code: `vision_model` (a patch encoder, itself a
PreTrainedModel), `mlp1` (the projector), `language_model` (a transformers LlamaForCausalLM),
loaded through `AutoModelForCausalLM`. `names` renames the three modules (and the vision
class) to build one that inspection cannot split.

The *processor* is a standard transformers LlavaProcessor (tokenizer with a chat template and
an `<image>` token it expands to 16 tokens): vlmtune's Encoder needs a processor that reports
token offsets and its placeholder expansions (`return_text_replacement_offsets`), which
transformers' own processors do; remote-code models mostly ship no processor at all.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = '''
from transformers import LlamaConfig, PretrainedConfig


class TinyVLConfig(PretrainedConfig):
    model_type = "tinyvl"
    sub_configs = {"llm_config": LlamaConfig}

    def __init__(self, llm_config=None, vision_hidden_size=32, image_size=56, patch_size=14, image_token_index=None, **kwargs):
        self.llm_config = LlamaConfig(**llm_config) if isinstance(llm_config, dict) else (llm_config or LlamaConfig())
        self.vision_hidden_size = vision_hidden_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_token_index = image_token_index
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.generation import GenerationMixin

from .configuration_tinyvl import TinyVLConfig


class VISION_CLASS(PreTrainedModel):
    """Patch embedding + one residual MLP block: [B, 3, H, W] -> [B, (H/p)*(W/p), vision_hidden]."""

    config_class = TinyVLConfig
    _supports_sdpa = True  # no attention here: nothing to refuse

    def __init__(self, config):
        super().__init__(config)
        h = config.vision_hidden_size
        self.patch_embed = nn.Conv2d(3, h, config.patch_size, config.patch_size)
        self.norm = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, 2 * h)
        self.fc2 = nn.Linear(2 * h, h)
        self.post_init()

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class TinyVLForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyVLConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        h, d = config.vision_hidden_size, config.llm_config.hidden_size
        self.VISION = VISION_CLASS(config)
        self.PROJECTOR = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d), nn.GELU(), nn.Linear(d, d))
        self.LLM = LlamaForCausalLM(config.llm_config)
        self.post_init()
EMBEDDINGS
    def embed(self, input_ids, pixel_values):
        """Token embeddings with each image's projected patches written over its image tokens."""
        embeds = self.LLM.get_input_embeddings()(input_ids)
        image = input_ids == self.config.image_token_index
        if pixel_values is not None and image.any():
            feats = self.PROJECTOR(self.VISION(pixel_values.to(embeds.dtype)))
            embeds = embeds.masked_scatter(image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.LLM(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """As InternVL's: the language model generates from the prompt's embeddings, so only the
        new tokens come back (not prompt + answer, as transformers' own VLMs return)."""
        return self.LLM.generate(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask, **kwargs)
'''

# InternVL's remote code leaves these to its language model; the "odd" variant leaves them out
# (transformers' default then raises NotImplementedError, and inspection must cope).
EMBEDDINGS = '''
    def get_input_embeddings(self):
        return self.LLM.get_input_embeddings()

    def get_output_embeddings(self):
        return self.LLM.get_output_embeddings()
'''

INTERNVL_NAMES = {"vision": "vision_model", "projector": "mlp1", "llm": "language_model", "vision_class": "TinyVLVisionModel"}
ODD_NAMES = {"vision": "eye", "projector": "bridge", "llm": "decoder", "vision_class": "TinyEncoder"}


def build_tiny_remote(out: Path, names: dict[str, str] = INTERNVL_NAMES, embeddings: bool = True) -> Path:
    """Write the tiny remote-code model (config + code + safetensors + processor) into `out`."""
    import importlib.util
    import sys

    import torch
    from transformers import LlamaConfig

    from conftest import tiny_llava_processor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    code = (MODELING.replace("VISION_CLASS", names["vision_class"]).replace("self.VISION", "self." + names["vision"])
            .replace("self.PROJECTOR", "self." + names["projector"]).replace("self.LLM", "self." + names["llm"])
            .replace("EMBEDDINGS\n", EMBEDDINGS.replace("self.LLM", "self." + names["llm"]) if embeddings else ""))
    (out / "configuration_tinyvl.py").write_text(CONFIGURATION)
    (out / "modeling_tinyvl.py").write_text(code)

    proc, ids = tiny_llava_processor()
    tok = proc.tokenizer

    # Import the code as a package (relative import inside), build the model, save it; the
    # config.json written then gets the auto_map that makes it remote code.
    pkg = f"_tinyvl_build_{abs(hash(str(out)))}"
    spec = importlib.util.spec_from_file_location(pkg, out / "__init__.py", submodule_search_locations=[str(out)])
    (out / "__init__.py").write_text("")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    try:
        cfg_mod = importlib.import_module(f"{pkg}.configuration_tinyvl")
        model_mod = importlib.import_module(f"{pkg}.modeling_tinyvl")
        llm = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                          tie_word_embeddings=False)
        cfg = cfg_mod.TinyVLConfig(llm_config=llm, image_token_index=ids["<image>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                   pad_token_id=ids["<pad>"])
        torch.manual_seed(0)
        model_mod.TinyVLForCausalLM(cfg).save_pretrained(out)
    finally:
        for k in [k for k in sys.modules if k == pkg or k.startswith(pkg + ".")]:
            del sys.modules[k]
        (out / "__init__.py").unlink()
    proc.save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_tinyvl.TinyVLConfig", "AutoModelForCausalLM": "modeling_tinyvl.TinyVLForCausalLM"}
    conf["architectures"] = ["TinyVLForCausalLM"]
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out

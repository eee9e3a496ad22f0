"""Offline tiny models: `tiny:<family>`.

Each builder makes a deterministic random-init model with the *real* transformers class
(hidden 64, 2 layers, vision depth 2), a byte-level BPE tokenizer trained here on a small
built-in corpus with the family's special tokens and chat template, and the family's real
processor. The result is saved with `save_pretrained` into the vlmtune cache and then loaded
back through the same loading code as a hub id or local directory, so tests and the demo
exercise exactly what users run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TINY_PREFIX = "tiny:"
TINY_VERSION = 2  # bump when a builder changes: cached models are keyed by it

QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-*-hf's chat template, verbatim: note it writes no </s> after an answer.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A small English corpus for the tokenizer: common words, colours, shapes, positions, numbers
# and question words, so short answers in tests and the demo are a few tokens each.
_WORDS = """
the a an is are was were be been of and or to in on at by for with from as that this these those it its
what which where who how many much color colour shape size position image picture photo object objects
red green blue yellow orange purple pink brown black white gray grey cyan magenta
circle square triangle rectangle star cross diamond ellipse line dot
left right top bottom center middle upper lower corner small large big tiny medium
one two three four five six seven eight nine ten zero yes no true false
there here has have shown show describe answer question word only single
you helpful assistant user system please short brief background noisy noise
cat dog car tree house person man woman child bird horse boat plane train bus street
sky water grass road building table chair food plate cup bottle phone book screen
""".split()


def _corpus() -> list[str]:
    lines = []
    for i, w in enumerate(_WORDS):
        lines.append(" ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(12)))
        lines.append(f"What {w} is the shape? {w}. The answer is {w}.")
        lines.append(w.capitalize() + " " + w + ", " + w + "?")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024 : ; - ( ) [ ] \" ' ! ? . ,")
    return lines * 4


def train_tokenizer(special_tokens: list[str], vocab_size: int = 1024, bos: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the built-in corpus.

    `special_tokens` get the lowest ids in order; `bos` (if given) is prepended on encode,
    as Llama-family tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _qwen_common(vl_version: str):
    """Tokenizer and processor shared by tiny Qwen2-VL and Qwen2.5-VL."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .families import FAMILIES
    from .processors import image_only

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer(specials)
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ip = Qwen2VLImageProcessorPil(
        **FAMILIES[vl_version].image_processor_kwargs(None, None), patch_size=14, merge_size=2, temporal_patch_size=2
    )
    proc = image_only(FAMILIES[vl_version].processor_class())(ip, tok, chat_template=QWEN_CHAT_TEMPLATE)
    return tok, proc


def _qwen_text_config(tok) -> dict:
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos", "<|endoftext|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # mrope_section must sum to head_dim/2 = 64/4/2 = 8
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=True,
        # At width 64 the usual 0.02 init caps logits near +-1 (|h|~8, |e|~0.16), so no
        # frozen-head model could ever be confident; 0.1 gives weight norms like a trained model's.
        initializer_range=0.1,
    )


def _qwen_vision_token_ids(tok) -> dict:
    t = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
         "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    return {k: tok.convert_tokens_to_ids(v) for k, v in t.items()}


def build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, proc = _qwen_common("qwen2_5_vl")
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tok),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=True,
        **_qwen_vision_token_ids(tok),
    )
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


def build_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok, proc = _qwen_common("qwen2_vl")
    cfg = Qwen2VLConfig(
        text_config=_qwen_text_config(tok),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=True,
        **_qwen_vision_token_ids(tok),
    )
    return Qwen2VLForConditionalGeneration(cfg), proc


def build_llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>")
    tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token = "<unk>", "<s>", "</s>", "<pad>"
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    image_size, patch = 56, 14
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(
        ip, tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>",
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=64,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(cfg), proc


BUILDERS: dict[str, Callable] = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen2_vl": build_qwen2_vl,
    "llava": build_llava,
}


def is_tiny(model_id: str) -> bool:
    return model_id.startswith(TINY_PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_HOME") or Path.home() / ".cache" / "vlmtune")


def tiny_dir(model_id: str) -> Path:
    """Build (once) and return the local directory of `tiny:<family>`."""
    from ..errors import UserError

    family = model_id[len(TINY_PREFIX):]
    if family not in BUILDERS:
        raise UserError(f"model id {model_id!r}", f"no tiny model for family {family!r}", f"use one of {', '.join('tiny:' + k for k in sorted(BUILDERS))}")
    out = cache_root() / "tiny" / f"{family}-v{TINY_VERSION}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: a crash or a concurrent builder never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=out.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, proc = BUILDERS[family]()
        eot = proc.tokenizer.eos_token_id
        model.generation_config.eos_token_id = eot
        model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
        model.generation_config.bos_token_id = proc.tokenizer.bos_token_id
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

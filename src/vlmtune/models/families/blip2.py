"""BLIP-2 (Salesforce/blip2-opt-*): ViT `vision_model`; projector = the Q-Former `qformer`,
its learned queries `query_tokens` (a bare nn.Parameter) and `language_projection`; LLM =
`language_model` (OPTForCausalLM, lm_head inside it).

Quirks:
- No chat template: BLIP-2's format is plain "Question: {q} Answer: {a}". The family's
  template renders that, one "Question: ... Answer:" per user turn, each answer followed by
  "\\n" (single- and multi-turn alike).
- End of turn is "\\n", not OPT's "</s>": LAVIS trained BLIP-2-OPT with "\\n" after every
  caption/answer and the hub checkpoints' generation_config stops on it (eos_token_id 50118,
  "\\n"), while the tokenizer's eos "</s>" is also OPT's BOS. Supervising "\\n" keeps
  fine-tuning on the convention the checkpoint already knows, so answers stay one line.
- Blip2Processor prepends `num_query_tokens` "<image>" tokens (before BOS) in a separate
  tokenizer call whenever images are given and reports no placeholder offsets: their
  offsets point into a string that is not the text, so the family's `process` hook gives
  them zero width (never supervised). The template and `image_markup` write no image text,
  and one sample carries one image (the processor adds the queries once per text).
- `query_tokens` is a parameter, not a module: it trains when the projector is `full` and no
  part uses LoRA; with LoRA anywhere it stays frozen (peft can neither wrap nor save a bare
  parameter, so the adapter could not carry it; apply_plan warns).
- Q-Former text FFNs (`intermediate`, `output`) exist only with use_qformer_text_input and
  are never run by image-to-text generation (queries only): frozen when present.
- Flan-T5 checkpoints (blip-2 with an encoder-decoder LLM) load but are not supported:
  vlmtune's labels are causal-LM labels over the whole sequence (T5 takes them as decoder
  targets) and its generation strips a prompt that T5's decoder output does not contain.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ...errors import UserError
from . import Family, PackingContext, register

# "Question: {q} Answer: {a}\n" per turn; images are never written (the processor prepends
# the query tokens itself). A system message, if any, leads the text.
BLIP2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + text + ' Answer:' }}"
    "{%- else -%}{{ ' ' + text + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def unused_qformer_text_ffn(model: nn.Module) -> tuple[str, ...]:
    """The Q-Former's text-branch FFNs: built only with use_qformer_text_input, and never run
    when the Q-Former sees only the learned queries (every image-to-text forward)."""
    cfg = model.config.qformer_config
    if not getattr(cfg, "use_qformer_text_input", False):
        return ()
    return tuple(f"qformer.encoder.layer.{i}.{m}." for i in range(cfg.num_hidden_layers) for m in ("intermediate", "output"))


def process_blip2(processor: Any, kwargs: dict[str, Any], spans: Optional[list] = None) -> Any:
    """Blip2Processor's output with its prepended query tokens given zero-width offsets.

    The processor tokenizes `"<image>" * num_query_tokens` separately and prepends the result,
    offsets included, so those offsets index that string rather than the text; zero width
    marks them as no text at all. It reports no replacement offsets (nothing in the text was
    replaced), so the text's own offsets stay valid as they are.
    """
    kwargs = dict(kwargs)
    kwargs.pop("return_text_replacement_offsets", None)
    images = kwargs.get("images")
    if images is not None and len(images) != len(kwargs["text"]):
        # The processor prepends one image's queries per text; with more images the model
        # would silently fill those slots with the wrong image's features.
        raise UserError("data", f"BLIP-2 takes one image per sample, got {len(images)} for {len(kwargs['text'])} text(s)", "keep one image per BLIP-2 sample")
    out = processor(**kwargs)
    if "offset_mapping" in out and images is not None and processor.num_query_tokens:
        image_id = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
        offsets = out["offset_mapping"]
        offsets[out["input_ids"] == image_id] = 0
    return out


def packed_mask(context: PackingContext, features: dict[str, Any]) -> torch.Tensor:
    """A packed sample's own attention, bool [n, n]: causal, its image's query embeddings
    included (OPT reads them causally, as in a padded batch). Packing needs it explicit:
    BLIP-2's forward replaces a missing attention mask by all ones, so transformers never
    gets to separate the samples by their positions."""
    n = int(features["input_ids"].shape[-1])
    return torch.ones(n, n, dtype=torch.bool).tril_()


def cannot_pack_blip2(model: nn.Module) -> Optional[str]:
    if not getattr(model.config, "use_decoder_only_language_model", True):
        return "BLIP-2 with an encoder-decoder LLM (Flan-T5) cannot pack"
    return None


def build_blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from ..tiny import train_tokenizer

    # OPT's special tokens in OPT's order; "</s>" is BOS, EOS and UNK as in facebook/opt-*.
    tok = train_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], bos="</s>")
    tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token = "</s>", "</s>", "</s>", "<pad>"
    image_size, patch, n_query = 56, 14, 8
    ip = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    proc = Blip2Processor(ip, tok, num_query_tokens=n_query)  # adds "<image>" to the tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "</s>", "<image>")}
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1, newline
    cfg = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch),
        qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, cross_attention_frequency=2),
        text_config=dict(
            model_type="opt", vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=512, pad_token_id=ids["<pad>"], bos_token_id=ids["</s>"],
            # the hub checkpoints' LLM eos is "\n" (50118), not the tokenizer's "</s>"
            eos_token_id=newline[0], init_std=0.1,
        ),
        num_query_tokens=n_query,
        image_token_index=ids["<image>"],
        initializer_range=0.1,
    )
    return Blip2ForConditionalGeneration(cfg), proc


def _blip2_processor() -> type:
    from transformers import Blip2Processor

    return Blip2Processor


register(
    Family(
        name="blip2",
        hf_model_types=("blip-2",),
        aliases=("blip2", "blip-2", "blip_2"),
        parts={"vision": ("vision_model",), "projector": ("query_tokens", "qformer", "language_projection"), "llm": ("language_model",)},
        # OPT's linears are q/k/v/out_proj + fc1/fc2 (no gate/up/down): every linear of the LLM
        # (lm_head excluded), which also covers a Flan-T5 LLM's q/k/v/o/wi/wo.
        lora_targets={"vision": ("qkv", "projection", "fc1", "fc2"), "projector": None, "llm": None},
        end_of_turn="\n",
        processor_class=_blip2_processor,
        unused_by_config=unused_qformer_text_ffn,
        image_markup="",
        chat_template=BLIP2_CHAT_TEMPLATE,
        process=process_blip2,
        build_tiny=build_blip2,
        packing="mask",
        packed_mask=packed_mask,
        cannot_pack=cannot_pack_blip2,
    )
)

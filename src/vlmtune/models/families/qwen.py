"""Qwen2-VL and Qwen2.5-VL: vision tower `model.visual` with its patch merger
`model.visual.merger` (the projector), LLM `model.language_model` + `lm_head`.

Quirks: dynamic resolution bounded by min_pixels/max_pixels (the seed's 224*224); the
transformers processor refuses to build without torchvision (video processor), so vlmtune
builds an image-only subclass.
"""

from __future__ import annotations

from typing import Any

import torch

from . import LLM_TARGETS, Family, PackingContext, register


class _RopeIndexSelf:
    """Stands in for `self` when Qwen*VLModel's `get_rope_index` is called without the model:
    in transformers 5.24 it reads only `self.config` (vision_config.spatial_merge_size,
    tokens_per_second) and `self.get_vision_position_ids`, which reads nothing of `self`.
    So a collator needs the config, not the weights (see `PackingContext`)."""

    def __init__(self, context: PackingContext):
        self.config = context.config
        self._owner = context.base_model_class

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._owner.get_vision_position_ids(self, *args, **kwargs)

    def get_rope_index(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner.get_rope_index(self, *args, **kwargs)


def packed_mrope_positions(context: PackingContext, features: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """M-RoPE positions of a packed row (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each sample's rope
    index computed as for that sample alone (Qwen*VLModel's `get_rope_index`, run on the
    config only: `_RopeIndexSelf`), concatenated, with the per-sample text positions
    prepended as row 0 -> [4, 1, T].

    Qwen*VLTextModel reads a 4-row position tensor as (text, temporal, height, width) and
    separates packed samples by the text row (where positions restart); in the plain 3-row
    form it does not look for packed samples at all, and they would attend to each other.
    """
    rope = _RopeIndexSelf(context)
    rows = []
    for f in features:
        grid = {"image_grid_thw": f["image_grid_thw"]} if f.get("image_grid_thw") is not None else {}
        pos, _ = rope.get_rope_index(f["input_ids"][None], f["mm_token_type_ids"][None], **grid)
        rows.append(pos.cpu())
    text = torch.cat([torch.arange(n) for n in lengths])[None, None]
    return {"position_ids": torch.cat([text, torch.cat(rows, dim=-1)], dim=0)}


def _qwen2_5_vl_processor() -> type:
    from transformers import Qwen2_5_VLProcessor

    return Qwen2_5_VLProcessor


def _qwen2_vl_processor() -> type:
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor


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


def _qwen_common(vl_version: str):
    """Tokenizer and processor shared by tiny Qwen2-VL and Qwen2.5-VL."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..processors import image_only
    from . import FAMILIES as FAMILIES_BY_NAME
    from ..tiny import train_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer(specials)
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ip = Qwen2VLImageProcessorPil(
        **FAMILIES_BY_NAME[vl_version].image_processor_kwargs(None, None), patch_size=14, merge_size=2, temporal_patch_size=2
    )
    proc = image_only(FAMILIES_BY_NAME[vl_version].processor_class())(ip, tok, chat_template=QWEN_CHAT_TEMPLATE)
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


register(
    Family(
        name="qwen2_5_vl",
        hf_model_types=("qwen2_5_vl",),
        aliases=("qwen_vl", "qwen2.5_vl", "qwen2.5-vl", "qwen2_5-vl", "qwen25_vl"),
        parts={"vision": ("model.visual",), "projector": ("model.visual.merger",), "llm": ("model.language_model", "lm_head")},
        lora_targets={"vision": ("qkv", "proj", "gate_proj", "up_proj", "down_proj"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="<|im_end|>",
        processor_class=_qwen2_5_vl_processor,
        needs_video_processor=True,
        dynamic_resolution=True,
        image_markup="<|vision_start|><|image_pad|><|vision_end|>",
        build_tiny=build_qwen2_5_vl,
        packing="position_ids",
        packed_inputs=packed_mrope_positions,
    )
)
register(
    Family(
        name="qwen2_vl",
        hf_model_types=("qwen2_vl",),
        aliases=("qwen_vl", "qwen2-vl"),
        parts={"vision": ("model.visual",), "projector": ("model.visual.merger",), "llm": ("model.language_model", "lm_head")},
        lora_targets={"vision": ("qkv", "proj", "fc1", "fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="<|im_end|>",
        processor_class=_qwen2_vl_processor,
        needs_video_processor=True,
        dynamic_resolution=True,
        image_markup="<|vision_start|><|image_pad|><|vision_end|>",
        build_tiny=build_qwen2_vl,
        packing="position_ids",
        packed_inputs=packed_mrope_positions,
    )
)

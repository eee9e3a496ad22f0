"""Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3): SigLIP-style vision encoder
`model.vision_model`, projector `model.connector` (pixel shuffle + one linear), Llama LLM
`model.text_model` + `lm_head`.

Quirks:
- The image processor splits an image into tiles of `max_image_size` (plus one global tile)
  when `do_image_splitting` is on and the image, resized to `size["longest_edge"]`, is larger
  than one tile; every tile costs `image_seq_len` = (tile/patch)^2 / scale_factor^2 tokens.
  The processor's own `preprocessor_config.json` keys (`size`, `max_image_size`,
  `do_image_splitting`) are the image-size controls; the tiny model uses one 56 px tile.
- `pixel_values` is [batch, images per sample, 3, H, W]: samples with different tile counts
  are zero-padded along the image axis when batched (the model drops all-zero images).
- The chat template writes `<|begin_of_text|>` itself, so the tokenizer's BOS must not be
  added again (the encoder skips it when the text already starts with BOS, as transformers'
  `apply_chat_template(tokenize=True)` does).
- Answers end with `<end_of_utterance>`; the vision encoder has no pooling head and its
  `post_layernorm` feeds the connector, so every vision parameter gets a gradient.
"""

from __future__ import annotations

from typing import Any

from . import LLM_TARGETS, Family, register

# HuggingFaceM4/Idefics3-8B-Llama3's chat template, verbatim (Idefics2's with a leading BOS):
# the role is followed by ':' alone when the message starts with an image, by ': ' otherwise.
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Special tokens the Idefics3/SmolVLM processors insert around image tokens.
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
ROW_COL_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

# SigLIP attention and MLP leaves of the vision encoder.
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# Tiny geometry: one 56 px tile of 7 px patches -> 8x8 patches -> pixel shuffle by 2 -> 16 tokens.
TINY_TILE, TINY_PATCH, TINY_SCALE = 56, 7, 2


def tiny_image_seq_len() -> int:
    return (TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE**2


def tiny_image_processor_kwargs() -> dict[str, Any]:
    """The size controls of an Idefics3/SmolVLM image processor, set for one small tile.

    `size.longest_edge` is what images are resized to before tiling; with it equal to
    `max_image_size.longest_edge`, every image is exactly one tile (rows = cols = 0), so
    an image costs `image_seq_len` tokens plus its wrapper tokens.
    """
    return {
        "do_image_splitting": True,
        "size": {"longest_edge": TINY_TILE},
        "max_image_size": {"longest_edge": TINY_TILE},
    }


def tiny_text_config(tok, bos: str, eos: str, pad: str) -> dict[str, Any]:
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos", bos), ("eos", eos), ("pad", pad))}
    return dict(
        model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )


def tiny_vision_config() -> dict[str, Any]:
    return dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_TILE, patch_size=TINY_PATCH,
    )


def _idefics3_processor() -> type:
    from transformers import Idefics3Processor

    return Idefics3Processor


def build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from ..tiny import train_tokenizer

    bos, eos, pad = "<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>"
    # Llama 3's tokenizer prepends <|begin_of_text|> on encode, like the real one.
    tok = train_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", *IMAGE_TOKENS, *ROW_COL_TOKENS], bos=bos)
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = IDEFICS3_CHAT_TEMPLATE
    ip = Idefics3ImageProcessorPil(**tiny_image_processor_kwargs())
    proc = Idefics3Processor(ip, tok, image_seq_len=tiny_image_seq_len(), chat_template=IDEFICS3_CHAT_TEMPLATE)
    cfg = Idefics3Config(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tok, bos, eos, pad),
        scale_factor=TINY_SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return Idefics3ForConditionalGeneration(cfg), proc


IDEFICS3_PARTS = {"vision": ("model.vision_model",), "projector": ("model.connector",), "llm": ("model.text_model", "lm_head")}
IDEFICS3_LORA_TARGETS = {"vision": VISION_TARGETS, "projector": None, "llm": LLM_TARGETS}

register(
    Family(
        name="idefics3",
        hf_model_types=("idefics3",),
        # SmolVLM v1 checkpoints (SmolVLM-Instruct, SmolVLM-256M/500M-Instruct) are idefics3
        aliases=("idefics-3", "idefics_3", "smolvlm", "smol_vlm"),
        parts=IDEFICS3_PARTS,
        lora_targets=IDEFICS3_LORA_TARGETS,
        end_of_turn="<end_of_utterance>",
        processor_class=_idefics3_processor,
        image_markup="<image>",
        build_tiny=build_idefics3,
        packing="position_ids",
    )
)

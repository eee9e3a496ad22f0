"""LLaVA-NeXT / LLaVA-1.6 (llava-hf): CLIP vision tower `model.vision_tower`, projector = the
MLP `model.multi_modal_projector` plus the learned `model.image_newline` vector, LLM
`model.language_model` + `lm_head` (Mistral in llava-v1.6-mistral-7b-hf, whose tokenizer and chat
template the tiny model copies).

Quirks:
- "anyres": each image is resized to the best of `image_grid_pinpoints` and split into tiles of
  the vision tower's input size, plus one downscaled whole-image tile; pixel_values are
  [images, tiles, 3, H, W]. Images of different aspect ratios give different tile counts; the
  collator zero-pads them and the model reads only the real tiles (via `image_sizes`).
- `image_newline` is appended after every row of tile features: it lives in LLM embedding space
  and is learned with the projector (as in LLaVA-NeXT's training), so it belongs to the
  projector part. It is a bare nn.Parameter, which peft's `modules_to_save` cannot hold, so it
  trains only when no part uses LoRA.
- as in LLaVA-1.5, features come from the penultimate CLIP layer (vision_feature_layer=-2): the
  last layer and `post_layernorm` never get a gradient and are frozen (DDP needs that).
- the template writes `</s>` after each answer itself and has no generation prompt: a prompt
  ends with " [/INST]".
"""

from __future__ import annotations

from . import LLM_TARGETS, Family, register
from .llava import tiny_clip_vision_config, tiny_llama_tokenizer, unused_vision_layers


def _llava_next_processor() -> type:
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor


# llava-hf/llava-v1.6-mistral-7b-hf's chat template, verbatim (the current one, which writes
# '</s> ' after an answer; early revisions had a '<\\s> ' typo there).
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def build_llava_next() -> tuple:
    """Tiny LLaVA-NeXT: 28 px CLIP tiles (2x2 patches of 14), pinpoints up to 2x2 tiles, so a
    56 px image is 1 + 4 tiles and 4 + 16 + 4 (newlines) = 24 image tokens."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_llama_tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], LLAVA_NEXT_CHAT_TEMPLATE)
    tile, patch = 28, 14
    # The real grid is [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] for 336 px
    # tiles; the tiny one keeps the 1x2 / 2x1 / 2x2 shapes only.
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, do_pad=True,
    )
    proc = LlavaNextProcessor(
        ip, tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE, image_token="<image>",
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    cfg = LlavaNextConfig(
        vision_config=tiny_clip_vision_config(tile, patch),
        text_config=dict(
            model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, sliding_window=None,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
            # at width 64 the default 0.02 init leaves logits nearly flat under a frozen head (see qwen.py)
            initializer_range=0.1,
        ),
        image_token_index=ids["<image>"],
        image_grid_pinpoints=pinpoints,
        image_seq_length=(tile // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


register(
    Family(
        name="llava_next",
        hf_model_types=("llava_next",),
        aliases=("llava-next", "llava_next", "llava-1.6", "llava_1.6", "llava-v1.6", "llava"),
        parts={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector", "model.image_newline"),
            "llm": ("model.language_model", "lm_head"),
        },
        lora_targets={"vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="</s>",
        processor_class=_llava_next_processor,
        # Features come from the penultimate CLIP layer (vision_feature_layer=-2), so the last
        # layer's post_layernorm never gets a gradient.
        never_trained=("model.vision_tower.post_layernorm",),
        unused_by_config=lambda model: unused_vision_layers(model, "model.vision_tower.encoder.layers"),
        image_markup="<image>\n",
        build_tiny=build_llava_next,
        packing="position_ids",
    )
)

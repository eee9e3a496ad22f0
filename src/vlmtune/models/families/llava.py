"""LLaVA-1.5 (llava-hf): CLIP vision tower `model.vision_tower`, MLP projector
`model.multi_modal_projector`, Llama LLM `model.language_model` + `lm_head`.

Quirks: features come from the penultimate CLIP layer (vision_feature_layer=-2), so the
last layer's `post_layernorm` never gets a gradient (frozen, or DDP fails); the hf chat
template writes no `</s>` after an answer (the encoder inserts it).
"""

from __future__ import annotations

from . import LLM_TARGETS, Family, register


def unused_vision_layers(model, layers_path: str) -> tuple[str, ...]:
    """Vision encoder layers after the one(s) named by `vision_feature_layer`: their output
    is never read, so they never get a gradient (llava-1.5 reads layer -2 of 24: layer 23
    is dead weight). hidden_states[k] is the output of k layers (0 = embeddings)."""
    cfg = model.config
    n = cfg.vision_config.num_hidden_layers
    wanted = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
    used = max(k if k >= 0 else n + 1 + k for k in wanted)  # layers 0..used-1 feed the features
    return tuple(f"{layers_path}.{i}." for i in range(used, n))


def tiny_llama_tokenizer(specials: list[str], chat_template: str):
    """The tiny tokenizer of the llava-hf checkpoints' Llama/Mistral style: <s> BOS, </s> EOS."""
    from ..tiny import train_tokenizer

    tok = train_tokenizer(specials, bos="<s>")
    tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token = "<unk>", "<s>", "</s>", "<pad>"
    tok.chat_template = chat_template
    return tok


def tiny_clip_vision_config(image_size: int, patch: int) -> dict:
    """A 2-layer, 64-wide CLIP vision tower."""
    return dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=64)


def _llava_processor() -> type:
    from transformers import LlavaProcessor

    return LlavaProcessor


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

def build_llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_llama_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], LLAVA_CHAT_TEMPLATE)
    image_size, patch = 56, 14
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(
        ip, tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>",
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    cfg = LlavaConfig(
        vision_config=tiny_clip_vision_config(image_size, patch),
        text_config=dict(
            model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
            # at width 64 the default 0.02 init leaves logits nearly flat under a frozen head (see qwen.py)
            initializer_range=0.1,
        ),
        image_token_index=ids["<image>"],
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(cfg), proc


register(
    Family(
        name="llava",
        hf_model_types=("llava",),
        aliases=("llava-1.5", "llava_1.5", "llava_gemma"),
        parts={"vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector",), "llm": ("model.language_model", "lm_head")},
        lora_targets={"vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="</s>",
        processor_class=_llava_processor,
        # LLaVA reads features from the penultimate CLIP layer (vision_feature_layer=-2), so the
        # last layer's post_layernorm never gets a gradient.
        never_trained=("model.vision_tower.post_layernorm",),
        unused_by_config=lambda model: unused_vision_layers(model, "model.vision_tower.encoder.layers"),
        image_markup="<image>\n",
        build_tiny=build_llava,
        packing="position_ids",
    )
)

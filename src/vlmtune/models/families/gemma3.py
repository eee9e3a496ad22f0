"""Gemma 3 (google/gemma-3-*-it, model_type `gemma3`): SigLIP vision tower
`model.vision_tower`, projector `model.multi_modal_projector` (average pool + RMSNorm + one
projection matrix), Gemma 3 LLM `model.language_model` + `lm_head` (tied to the embeddings).

Quirks:
- The user writes `<start_of_image>`; the processor expands it to
  "\\n\\n<start_of_image>" + `<image_soft_token>` x mm_tokens_per_image + "<end_of_image>\\n\\n".
  Its `image_token(_id)` is the `<start_of_image>` marker, so the family names the token
  that actually carries the image (`<image_soft_token>`) for counting and display.
- The processor returns `token_type_ids` (1 on image tokens): the model attends
  bidirectionally within each image from them, in training and at the prefill of generation,
  so the encoder and the collator keep them (padding = 0, text).
- The chat template writes `<bos>` itself and the tokenizer adds one too: the encoder skips
  the tokenizer's when the text already starts with it (as transformers'
  `apply_chat_template(tokenize=True)` does). Answers end with `<end_of_turn>`; the template
  trims message text and requires user/assistant turns to alternate.
- Gemma 3 checkpoints build SigLIP without its pooling head (`vision_use_head: false`) and
  the projector reads `post_layernorm`'s output, so every vision parameter gets a gradient;
  a checkpoint that does carry the head has it frozen (never read).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from . import LLM_TARGETS, Family, PackingContext, register

# google/gemma-3-*-it's chat template, verbatim.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

VISION = "model.vision_tower"


def unused_vision_head(model: nn.Module) -> tuple[str, ...]:
    """SigLIP's attention-pooling head, when the checkpoint has one: the projector reads the
    patch features, never the pooled output."""
    head = f"{VISION}.vision_model.head."
    return (head,) if any(n.startswith(head) for n, _ in model.named_parameters()) else ()


def packed_masks(context: PackingContext, features: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A packed sample's own attention, bool [n, n] per layer type (Gemma3Model takes a dict
    of ready masks as is): `full_attention` = causal, or both tokens in the same image (images
    are read bidirectionally); `sliding_attention` = that and less than `sliding_window`
    tokens back (the same tensor when the window covers the whole sample).

    transformers' own packed path (positions restarting per sample, no mask) gets the sliding
    layers' mask wrong: it passes the image-block overlay as an extra mask function, which is
    then remapped to the per-sample positions like the causal one and so looks at the wrong
    tokens' image blocks (transformers 5.24, modeling_gemma3.create_masks_for_vision_model).
    """
    is_img = torch.as_tensor(features["token_type_ids"]).reshape(-1) == 1
    n = is_img.numel()
    starts = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:-1]
    block = torch.where(is_img, starts.cumsum(0), 0)  # one id per image, 0 for text
    # comparisons broadcast straight into bool [n, n]: no int64 n x n temporaries
    full = torch.ones(n, n, dtype=torch.bool).tril_() | ((block[:, None] == block[None, :]) & is_img[:, None])
    window = context.config.get_text_config().sliding_window
    # keys less than `window` back: j > i - window, the band above diagonal 1 - window
    sliding = full.triu(1 - window) if window and window < n else full
    return {"full_attention": full, "sliding_attention": sliding}


def _gemma3_processor() -> type:
    from transformers import Gemma3Processor

    return Gemma3Processor


def build_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..tiny import train_tokenizer

    mm = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    # Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; its tokenizer prepends <bos> on encode.
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *mm.values()]
    tok = train_tokenizer(specials, bos="<bos>")
    tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token = "<pad>", "<eos>", "<bos>", "<unk>"
    # Named multimodal tokens (tokenizer.boi_token, .image_token ...), saved in tokenizer_config
    # as the real one's are; Gemma3Processor reads them.
    tok._set_model_specific_special_tokens(mm)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    image_size, patch, tokens = 56, 7, 16  # 8x8 patches average-pooled 2x2 -> 16 image tokens
    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    proc = Gemma3Processor(ip, tok, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", *mm.values())}
    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=4096,
            # one local (sliding) and one global layer, as Gemma 3 interleaves them
            sliding_window=512, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"],
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=image_size, patch_size=patch, vision_use_head=False,
        ),
        mm_tokens_per_image=tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    # transformers starts the projection matrix at zero (checkpoints overwrite it); left at zero
    # in a random model it would cut every gradient to the vision tower.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, cfg.initializer_range)
    return model, proc


register(
    Family(
        name="gemma3",
        hf_model_types=("gemma3",),
        aliases=("gemma-3", "gemma_3"),
        parts={"vision": (VISION,), "projector": ("model.multi_modal_projector",), "llm": ("model.language_model", "lm_head")},
        lora_targets={"vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="<end_of_turn>",
        processor_class=_gemma3_processor,
        unused_by_config=unused_vision_head,
        image_markup="<start_of_image>",
        nested_images=True,
        image_token="<image_soft_token>",
        build_tiny=build_gemma3,
        packing="mask",
        packed_mask=packed_masks,
    )
)

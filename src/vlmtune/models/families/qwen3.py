"""Qwen3-VL: vision tower `model.visual` (ViT, patch 16, learned position grid resampled
per image, 2-D RoPE), projector = the patch merger `model.visual.merger` *and* the DeepStack
mergers `model.visual.deepstack_merger_list`, LLM `model.language_model` (Qwen3 with q/k norm,
interleaved M-RoPE) + `lm_head`.

Why the DeepStack mergers are projector: each is the same module class as the main merger
(norm -> 2x2 patch merge -> MLP to the LLM width) and maps features of an intermediate ViT layer
into LLM space, where they are added to the hidden states of the first LLM layers. They are
vision->language connectors, not vision features; ms-swift's Qwen3-VL arch lists the same two
paths as its "aligner". Both sit inside `model.visual`, which works because a parameter belongs
to its longest matching part path.

Quirks: dynamic resolution bounded by min_pixels/max_pixels through the image processor's
`size` = {shortest_edge, longest_edge} (the same keys as Qwen2-VL's; pixel counts, now rounded
to multiples of patch 16 x merge 2 = 32 px); the transformers processor refuses to build without
torchvision (video processor), so vlmtune builds an image-only subclass; the processor returns
`mm_token_type_ids`, which the model needs for M-RoPE; the chat template writes no default
system prompt (unlike Qwen2-VL's).
"""

from __future__ import annotations

from . import LLM_TARGETS, Family, register
from .qwen import packed_mrope_positions


def _qwen3_vl_processor() -> type:
    from transformers import Qwen3VLProcessor

    return Qwen3VLProcessor


# Qwen/Qwen3-VL-*-Instruct's chat template, verbatim (5292 bytes, sha256 3636d0f0bd6b...).
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_qwen3_vl() -> tuple:
    """Tiny Qwen3-VL: 2 ViT blocks (block 0 also feeds one DeepStack merger), 2 LLM layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..processors import image_only
    from ..tiny import train_tokenizer
    from . import FAMILIES

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer(specials)
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    fam = FAMILIES["qwen3_vl"]
    # Qwen3-VL's preprocessor: patch 16, merge 2, mean/std 0.5 (not CLIP's).
    ip = Qwen2VLImageProcessorPil(
        **fam.image_processor_kwargs(None, None), patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    proc = image_only(fam.processor_class())(ip, tok, chat_template=QWEN3_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            # head_dim 16 -> 8 rotary frequencies, interleaved T/H/W; [4, 2, 2] keeps the real
            # checkpoints' [24, 20, 20] shape (T gets the rest, H and W alternate).
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
            # At width 64 the usual 0.02 init caps logits near +-1; 0.1 gives weight norms like a
            # trained model's (see qwen.py).
            initializer_range=0.1,
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return Qwen3VLForConditionalGeneration(cfg), proc


register(
    Family(
        name="qwen3_vl",
        hf_model_types=("qwen3_vl",),
        aliases=("qwen3-vl", "qwen3vl", "qwen_vl"),
        parts={
            "vision": ("model.visual",),
            "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
            "llm": ("model.language_model", "lm_head"),
        },
        # Vision blocks: attn.qkv/attn.proj and mlp.linear_fc1/fc2 (the mergers' linear_fc1/fc2
        # belong to the projector; targets are scoped to their part, so they are not wrapped).
        lora_targets={"vision": ("qkv", "proj", "linear_fc1", "linear_fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="<|im_end|>",
        processor_class=_qwen3_vl_processor,
        needs_video_processor=True,
        dynamic_resolution=True,
        image_markup="<|vision_start|><|image_pad|><|vision_end|>",
        build_tiny=build_qwen3_vl,
        packing="position_ids",
        packed_inputs=packed_mrope_positions,
    )
)

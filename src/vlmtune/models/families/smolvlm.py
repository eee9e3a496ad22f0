"""SmolVLM (HuggingFaceTB/SmolVLM2-*, model_type `smolvlm`): the Idefics3 layout -- vision
encoder `model.vision_model`, projector `model.connector` (pixel shuffle + linear), SmolLM2
LLM `model.text_model` + `lm_head` -- with the same tiling image processor and
`<end_of_utterance>` turns (see idefics3.py for those quirks).

SmolVLM v1 checkpoints (HuggingFaceTB/SmolVLM-Instruct, SmolVLM-256M/500M-Instruct) are
`model_type: idefics3` and load as the idefics3 family; `smolvlm` names both.

Quirks: the transformers processor insists on a video processor (torchvision) and on
`num2words` (video frame captions) even for images, so vlmtune builds an image-only
`SmolVLMProcessor` that needs neither; its chat template writes `<|im_start|>` itself and
the tokenizer adds no BOS.
"""

from __future__ import annotations

import functools

from . import Family, register
from .idefics3 import (
    IDEFICS3_LORA_TARGETS,
    IDEFICS3_PARTS,
    IMAGE_TOKENS,
    ROW_COL_TOKENS,
    TINY_SCALE,
    tiny_image_processor_kwargs,
    tiny_image_seq_len,
    tiny_text_config,
    tiny_vision_config,
)

# HuggingFaceTB/SmolVLM-*-Instruct's chat template, verbatim (as in transformers' SmolVLM
# processor tests): Idefics3's with `<|im_start|>` in place of `<|begin_of_text|>`.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@functools.cache
def smolvlm_image_processor_class() -> type:
    """`SmolVLMProcessor` without its video processor and without `num2words`.

    Same image and text handling as the real class, and the real class's name, so a processor
    saved from it reloads with `AutoProcessor` wherever torchvision is installed.
    """
    from transformers import ProcessorMixin, SmolVLMProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor.__init__ minus the num2words check and the video processor.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # The real one reads video sampling defaults from the video processor first.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return type(
        "SmolVLMProcessor",
        (SmolVLMProcessor,),
        {"__init__": __init__, "apply_chat_template": apply_chat_template, "__module__": __name__,
         "__doc__": "Image-only SmolVLMProcessor (no torchvision, no num2words needed)."},
    )


def build_smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from ..tiny import train_tokenizer

    bos, eos, pad = "<|im_start|>", "<end_of_utterance>", "<|im_end|>"
    # SmolLM2's tokenizer adds no BOS on encode; the chat template writes <|im_start|>.
    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS, *ROW_COL_TOKENS])
    tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = bos, eos, pad, "<|endoftext|>"
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    ip = SmolVLMImageProcessorPil(**tiny_image_processor_kwargs())
    proc = smolvlm_image_processor_class()(ip, tok, image_seq_len=tiny_image_seq_len(), chat_template=SMOLVLM_CHAT_TEMPLATE)
    cfg = SmolVLMConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tok, bos, eos, pad),
        scale_factor=TINY_SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return SmolVLMForConditionalGeneration(cfg), proc


register(
    Family(
        name="smolvlm",
        hf_model_types=("smolvlm",),
        aliases=("smol_vlm", "smol-vlm", "smolvlm2", "smolvlm-2"),
        parts=IDEFICS3_PARTS,
        lora_targets=IDEFICS3_LORA_TARGETS,
        end_of_turn="<end_of_utterance>",
        processor_class=smolvlm_image_processor_class,
        needs_video_processor=True,
        nested_images=True,
        image_markup="<image>",
        build_tiny=build_smolvlm,
        packing="position_ids",
    )
)

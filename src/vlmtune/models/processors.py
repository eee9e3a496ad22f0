"""Image-only processors for families whose transformers processor insists on a video
processor (which needs torchvision).

Without torchvision, `Qwen2VLProcessor`/`Qwen2_5_VLProcessor` refuse to build and
`AutoProcessor.from_pretrained` silently returns just the tokenizer. The classes made here
take only `image_processor` and `tokenizer`, behave the same for images and text, and carry
the real class's *name*, so a processor saved from them reloads with the real class
(`AutoProcessor`) wherever torchvision is installed.
"""

from __future__ import annotations

import functools

from transformers import ProcessorMixin


@functools.cache
def image_only(processor_cls: type) -> type:
    """A subclass of `processor_cls` that needs no video processor.

    Args:
        processor_cls: a transformers processor whose `__init__` sets `image_token`,
            `image_token_id`, `video_token`, `video_token_id` from the tokenizer.
    """
    import inspect

    if "video_processor" not in inspect.signature(processor_cls.__init__).parameters:
        # Already image-only: a family's own subclass (SmolVLM's, whose __init__ differs).
        return processor_cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(
        processor_cls.__name__,
        (processor_cls,),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"Image-only {processor_cls.__name__} (no torchvision needed)."},
    )


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())

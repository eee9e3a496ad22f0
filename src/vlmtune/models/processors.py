"""Image-only processors for families whose transformers processor insists on a video
processor (which needs torchvision).

Without torchvision, `Qwen2VLProcessor`/`Qwen2_5_VLProcessor` refuse to build and
`AutoProcessor.from_pretrained` refuses to load them. The classes made here take only
`image_processor` and `tokenizer`, behave the same for images and text, and carry the real
class's *name*, so a processor saved from them (`save_processor`) reloads with the real class
(`AutoProcessor`) wherever torchvision is installed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from transformers import ProcessorMixin

if TYPE_CHECKING:  # families import this module (image_only): no runtime import back
    from .families import Family

LEGACY_IMAGE_PROCESSOR = "preprocessor_config.json"
"""The image processor's own file: where a processor's video processor looks for its config
when no `video_preprocessor_config.json` was saved."""


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


def save_processor(processor: Any, family: Optional["Family"], folder: Path) -> None:
    """Save `processor` into `folder` so plain transformers loads it as vlmtune used it.

    The one implementation behind a run's `final/` and `lora_adapter/` and `vlmtune export`:

    - the processor as it is (resolution bounds included);
    - the family's prompt format as its chat template where the processor has none (BLIP-2,
      PaliGemma), so a plain `apply_chat_template` renders what evaluation rendered (BLIP-2's
      processor class takes no chat template: transformers gives the saved one to its tokenizer);
    - the image processor's legacy `preprocessor_config.json` where the family's processor
      class also wants a video processor that was not built (no torchvision here): without it
      `AutoProcessor` finds no video-processor config even where torchvision is installed.

    `processor` itself is left as it was: the caller may go on evaluating with it.
    """
    template = getattr(processor, "chat_template", None)
    if template is None and family is not None and family.chat_template:
        processor.chat_template = family.chat_template
    try:
        processor.save_pretrained(folder)
    finally:
        if template is None and family is not None and family.chat_template:
            processor.chat_template = None
    if family is not None and family.needs_video_processor and getattr(processor, "video_processor", None) is None:
        if not (Path(folder) / LEGACY_IMAGE_PROCESSOR).is_file():
            processor.image_processor.save_pretrained(folder)

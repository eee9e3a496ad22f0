"""Load a model + processor from a hub id, a local directory or `tiny:<family>`.

One code path for all three: `tiny:` ids are built and saved locally first, then loaded
from that directory exactly like a user's checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import ModelConfig, VisualEncoderSettings
from ..errors import UserError
from .families import Family, PartMap, find_family, resolve_parts
from .processors import has_torchvision, image_only
from .tiny import is_tiny, tiny_dir

log = logging.getLogger("vlmtune")


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    family: Optional[Family]
    parts: PartMap
    path: str
    """Where the base weights come from (a local dir for tiny models): adapters point here."""
    newly_initialized: list[str] = field(default_factory=list)
    """Parameter names the checkpoint did not contain (random init)."""

    @property
    def family_name(self) -> str:
        return self.family.name if self.family else "generic"


def resolve_model_path(model_id: str) -> str:
    if is_tiny(model_id):
        return str(tiny_dir(model_id))
    return model_id


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@contextlib.contextmanager
def _quiet_transformers(enabled: bool):
    """Silence transformers' per-weight init warnings while loading (we summarise them)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _hf_config(path: str, mcfg: ModelConfig, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        local = Path(path).exists()
        msg = str(e).splitlines()[0][:200]
        if "trust_remote_code" in str(e):
            raise UserError(where, f"{path!r} needs its own Python code to load", "set trust_remote_code: true on this model if you trust the repository") from None
        if local:
            raise UserError(where, f"{path!r} is not a loadable model directory ({msg})", "point hf_model_id at a folder with config.json") from None
        raise UserError(where, f"model {path!r} not found locally and could not be fetched ({msg})", "check the id, download it first, or use a local path or tiny:<family>") from None


def load_processor(path: str, family: Optional[Family], mcfg: ModelConfig, where: str = "model"):
    """The family's processor, image-only where its transformers class needs torchvision."""
    from transformers import AutoProcessor, ProcessorMixin

    size_kwargs = family.image_processor_kwargs(mcfg.min_pixels, mcfg.max_pixels) if family else {}
    if family is not None and family.needs_video_processor and not has_torchvision():
        # AutoProcessor would hand back only the tokenizer here; build the image-only class.
        proc = image_only(family.processor_class()).from_pretrained(path)
    else:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    if not isinstance(proc, ProcessorMixin) or getattr(proc, "image_processor", None) is None:
        raise UserError(where, f"{path!r} has no image processor (got {type(proc).__name__})", "is this a vision-language model? set model_type to its family")
    if size_kwargs:
        # Qwen-VL dynamic resolution: bound the pixel count (seed: 224*224) so the number of
        # image tokens -- and memory -- stays predictable.
        ip = proc.image_processor
        ip.size = dict(size_kwargs["size"])
        for k, v in (("min_pixels", size_kwargs["size"]["shortest_edge"]), ("max_pixels", size_kwargs["size"]["longest_edge"])):
            if hasattr(ip, k):
                setattr(ip, k, v)
    if mcfg.image_processor:
        # User overrides of the image-size controls (tile size, splitting, resize bounds):
        # only keys the image processor already has, so a typo cannot pass silently.
        ip = proc.image_processor
        for k, v in mcfg.image_processor.items():
            if not hasattr(ip, k):
                known = sorted(a for a in vars(ip) if not a.startswith("_"))
                raise UserError(f"{where}.image_processor.{k}", f"{type(ip).__name__} has no setting {k!r}", f"known settings: {', '.join(known)}")
            setattr(ip, k, v)
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def load_model(
    mcfg: ModelConfig,
    ve: Optional[VisualEncoderSettings] = None,
    where: str = "model",
    device_map: Optional[str] = None,
) -> LoadedModel:
    """Load `mcfg.hf_model_id` for training or generation.

    Reports (log) how many weights were newly initialized and in which parts; with
    `improve_initialization` re-initialises exactly those weights (Xavier-uniform).
    """
    from transformers import AutoModelForImageTextToText

    ve = ve or VisualEncoderSettings()
    path = resolve_model_path(mcfg.hf_model_id)
    hf_cfg = _hf_config(path, mcfg, where)
    family = find_family(mcfg.model_type, getattr(hf_cfg, "model_type", None), f"{where}.model_type")
    dtype = pick_dtype(mcfg.torch_dtype)
    # Weights load from safetensors only: a pickle (.bin/.pt) can run code when unpickled.
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": mcfg.trust_remote_code, "output_loading_info": True, "use_safetensors": True}
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    if mcfg.load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"{where}.load_in_4bit", "bitsandbytes is not installed", "pip install 'vlmtune[quant]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["lm_head", "multi_modal_projector", "merger", "visual", "vision_tower"],
        )
        kwargs["device_map"] = device_map or ("auto" if torch.cuda.is_available() else "cpu")
    elif device_map:
        kwargs["device_map"] = device_map
    with _quiet_transformers(ve.suppress_init_warnings):
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        except OSError as e:
            if "safetensors" in str(e) or ".bin" in str(e):
                raise UserError(where, f"{path!r} has no safetensors weights (vlmtune does not load pickled .bin/.pt weights: unpickling can run code)",
                                "convert the checkpoint to safetensors (transformers' save_pretrained writes them) or use a repository that ships them") from None
            raise
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise UserError(where, f"{path!r} ({hf_cfg.model_type}) is not an image-text-to-text model", "use a vision-language checkpoint") from None
            raise
    parts = resolve_parts(model, family)
    missing = sorted(set(info.get("missing_keys", [])))
    if missing:
        _report_new_weights(model, parts, missing, ve)
    processor = load_processor(path, family, mcfg, where)
    return LoadedModel(model=model, processor=processor, family=family, parts=parts, path=path, newly_initialized=missing)


def _report_new_weights(model: nn.Module, parts: PartMap, missing: list[str], ve: VisualEncoderSettings) -> None:
    params = dict(model.named_parameters())
    by_part: dict[str, list[str]] = {}
    for name in missing:
        by_part.setdefault(parts.part_of(name), []).append(name)
    summary = ", ".join(
        f"{part}: {len(names)} tensors / {sum(params[n].numel() for n in names if n in params):,} params" for part, names in sorted(by_part.items())
    )
    action = "re-initialised with Xavier-uniform (improve_initialization: true)" if ve.improve_initialization else "left at the model's default random init"
    log.warning(
        "%d weights were newly initialized (%s): the checkpoint does not contain them, so they start random and "
        "must be trained before the model is useful -- normal for a projector or head added on top of pretrained parts, "
        "a problem if you expected a finished model. They were %s.",
        len(missing), summary, action,
    )
    if ve.improve_initialization:
        xavier_reinit(model, missing)


@torch.no_grad()
def xavier_reinit(model: nn.Module, names: list[str]) -> None:
    """Xavier-uniform for matrices, zero for biases, one for other vectors (norm scales)."""
    params = dict(model.named_parameters())
    for n in names:
        p = params.get(n)
        if p is None:
            continue
        if p.dim() >= 2:
            nn.init.xavier_uniform_(p)
        elif n.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def load_processor_only(mcfg: ModelConfig, where: str = "model") -> tuple[Any, Optional[Family]]:
    """Processor and family without loading weights (preview, token counting)."""
    path = resolve_model_path(mcfg.hf_model_id)
    hf_cfg = _hf_config(path, mcfg, where)
    family = find_family(mcfg.model_type, getattr(hf_cfg, "model_type", None), f"{where}.model_type")
    return load_processor(path, family, mcfg, where), family

"""Precision as seed 001 means it: refuse what the machine cannot run, keep the trained
tensors in one dtype (or in float32 where fp16 loss scaling needs it), and check the dtype
when resuming."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import Config, ModelConfig
from ..errors import UserError

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def check_precision(cfg: Config, mcfg: ModelConfig, where: str) -> None:
    """Refuse precisions this machine cannot run, before any weights load."""
    cuda = torch.cuda.is_available()
    mp = cfg.training.mixed_precision
    if mp == "fp16" and not cuda:
        raise UserError("training.mixed_precision", "fp16 needs a CUDA GPU and none is available", "use mixed_precision: bf16 or no on CPU")
    if mp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("training.mixed_precision", "bf16 is not supported by this GPU", "use mixed_precision: fp16")
    if mcfg.torch_dtype == "float16" and not cuda:
        raise UserError(f"{where}.torch_dtype", "float16 weights cannot be trained on CPU", "use torch_dtype: float32 or bfloat16 (or auto)")
    if mcfg.torch_dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where}.torch_dtype", "bfloat16 is not supported by this GPU", "use torch_dtype: float16 or float32")


def trainable_dtype(weights: torch.dtype, mixed_precision: str) -> torch.dtype:
    """The dtype trained tensors are kept in.

    Seed 001 keeps every tensor in the weights' dtype (LoRA weights included; peft would make
    them float32 beside bfloat16 weights). Under fp16 mixed precision the GradScaler cannot
    unscale float16 gradients, so what trains is float32 there (autocast still runs the
    matmuls in float16).
    """
    return torch.float32 if mixed_precision == "fp16" else weights


def cast_trainables(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every parameter that requires grad to `dtype`; returns how many were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def _safetensors_dtypes(path: Path) -> set[torch.dtype]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {_SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__" and v.get("dtype") in _SAFETENSORS_DTYPES}


def checkpoint_dtypes(ckpt: Path) -> tuple[set[torch.dtype], bool]:
    """Floating dtypes of a checkpoint's weights, and whether it is an adapter checkpoint
    (only the trained tensors) rather than the whole model."""
    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        return _safetensors_dtypes(adapter), True
    found: set[torch.dtype] = set()
    for f in sorted(ckpt.glob("model*.safetensors")):
        found |= _safetensors_dtypes(f)
    return found, False


def check_resume_dtype(ckpt: Optional[str], model: nn.Module, where: str) -> None:
    """Refuse to resume from a checkpoint whose weights have another dtype than the model
    this run built (e.g. float32 checkpoints under a bfloat16 config): the Trainer would load
    them silently cast, and the run would no longer be the one that was started."""
    if not ckpt:
        return
    saved, adapter = checkpoint_dtypes(Path(ckpt))
    if not saved:
        return  # sharded (FSDP/DeepSpeed) checkpoints: their own loaders check shapes and dtypes
    ours = {p.dtype for p in model.parameters() if p.is_floating_point() and (p.requires_grad or not adapter)}
    if saved != ours:
        have = ", ".join(sorted(_NAMES.get(d, str(d)) for d in saved))
        want = ", ".join(sorted(_NAMES.get(d, str(d)) for d in ours))
        raise UserError(
            f"{where}.torch_dtype",
            f"{Path(ckpt).name} holds {have} weights but this run trains {want} ones",
            "set torch_dtype (and mixed_precision) as when the run started to resume it, or set training.resume: never / a new output_dir to start over",
        )

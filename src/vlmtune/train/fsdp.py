"""FSDP (seed 001: `fsdp: "full_shard auto_wrap"`) through torch's FSDP2 (`fully_shard`).

Why we call `fully_shard` ourselves instead of passing `fsdp=` to `TrainingArguments`:
on CPU (gloo), accelerate drops the FSDP plugin and trains plain DDP without a word (its
FSDP switch only exists for GPU-type states), and FSDP1 refuses to start; we need one path
that CI can prove on CPU and that a GPU runs the same way. So:

- `shard_model` wraps every block the model declares unsplittable (transformers'
  `_no_split_modules`, or `fsdp_config.transformer_layer_cls_to_wrap`), then the root,
  after LoRA is applied (frozen and trainable weights may share a group under FSDP2) and
  after rank 0's weights are broadcast (fully_shard slices each rank's local copy). The
  model is marked prepared, so accelerate neither wraps it in DDP nor re-shards it.
- Parameter names survive `fully_shard`, so the part-wise optimizer groups are built as
  without FSDP, with every part's learning rate (FSDP1's `use_orig_params: false` would
  flatten them away: not used).
- `checkpointing.CheckpointMixin` makes the Trainer's checkpoints full (unsharded) files
  that rank 0 writes after every rank joined the gather: `checkpoint-N/` and `final/` load
  with plain transformers/peft, and a resume scatters them back into the shards.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import Any, Optional

import torch
import torch.nn as nn

from .. import dist
from ..errors import UserError

log = logging.getLogger("vlmtune")

# Seed 001's fsdp_config keys (with or without the `fsdp_` prefix) and what FSDP2 makes of them.
_KNOWN = {
    "transformer_layer_cls_to_wrap", "min_num_params", "backward_prefetch", "forward_prefetch", "limit_all_gathers",
    "use_orig_params", "cpu_offload", "offload_params", "sync_module_states", "state_dict_type", "activation_checkpointing",
    "version", "reshard_after_forward",
}
_NO_EFFECT = {  # FSDP1 knobs that FSDP2 has no use for
    "backward_prefetch": "FSDP2 prefetches by itself",
    "forward_prefetch": "FSDP2 prefetches by itself",
    "limit_all_gathers": "FSDP2 has no rate limiter to switch",
    "use_orig_params": "FSDP2 always keeps the original parameters (so per-part learning rates work)",
    "sync_module_states": "rank 0's weights are always broadcast before sharding",
    "min_num_params": "blocks are wrapped by class (_no_split_modules)",
    "state_dict_type": "checkpoints are always full state dicts that plain transformers loads",
}


def normalize_fsdp_config(raw: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Seed 001's `fsdp_config` with the `fsdp_` prefixes dropped; unknown keys refused."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k[len("fsdp_"):] if k.startswith("fsdp_") else k
        if key not in _KNOWN:
            raise UserError(f"training.fsdp_config.{k}", "unknown FSDP setting", f"known settings: {', '.join(sorted(_KNOWN))}")
        out[key] = v
    return out


def check_fsdp(fsdp: Optional[str], fsdp_config: Optional[dict[str, Any]], quantized: bool = False) -> None:
    """Refuse FSDP settings that cannot run here, before anything loads."""
    if not fsdp:
        return
    words = set(fsdp.split())
    unknown = words - {"full_shard", "shard_grad_op", "auto_wrap", "offload", "hybrid_shard"}
    if unknown:
        raise UserError("training.fsdp", f"unknown option(s) {', '.join(sorted(unknown))}", "use e.g. \"full_shard auto_wrap\"")
    if "hybrid_shard" in words:
        raise UserError("training.fsdp", "hybrid_shard is not supported", "use full_shard (or shard_grad_op)")
    if not dist.launched():
        raise UserError("training.fsdp", f"{fsdp!r} needs several processes, but this is a single process",
                        "launch with torchrun --nproc_per_node N -m vlmtune train CONFIG, or remove training.fsdp")
    if quantized:
        raise UserError("training.fsdp", "a 4/8-bit (bitsandbytes) model cannot be sharded here",
                        "drop training.fsdp (QLoRA trains under DDP: torchrun without fsdp), or load_in_4bit: false")
    cfg = normalize_fsdp_config(fsdp_config)
    if cfg.get("version") not in (None, 2):
        raise UserError("training.fsdp_config.version", f"{cfg['version']!r}: only FSDP2 is used", "drop fsdp_version (FSDP2 keeps per-part learning rates)")


def _block_classes(model: nn.Module, cfg: dict[str, Any]) -> set[str]:
    names = cfg.get("transformer_layer_cls_to_wrap")
    if names:
        return {names} if isinstance(names, str) else set(names)
    found: set[str] = set()
    for m in model.modules():
        found |= set(getattr(m, "_no_split_modules", None) or [])
    return found


def shard_model(model: nn.Module, fsdp: str, fsdp_config: Optional[dict[str, Any]]) -> nn.Module:
    """Apply FSDP2 to `model` in place (every rank calls it); returns `model`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    cfg = normalize_fsdp_config(fsdp_config)
    ignored = sorted(k for k in cfg if k in _NO_EFFECT)
    if ignored and dist.is_main():
        log.info("fsdp_config: %s", "; ".join(f"{k} has no effect ({_NO_EFFECT[k]})" for k in ignored))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # nccl broadcasts device tensors; each rank's device was set when the group started
        model.to(torch.device("cuda", torch.cuda.current_device()))
    mesh = init_device_mesh(device, (dist.world_size(),))
    with torch.no_grad():  # fully_shard keeps each rank's own slice: start every rank from rank 0's weights
        for t in chain(model.parameters(), model.buffers()):
            torch.distributed.broadcast(t.data, src=0)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": "shard_grad_op" not in fsdp.split()}
    if cfg.get("cpu_offload") or cfg.get("offload_params") or "offload" in fsdp.split():
        kwargs["offload_policy"] = CPUOffloadPolicy()
    classes = _block_classes(model, cfg)
    n = 0
    for m in model.modules():
        if type(m).__name__ in classes:
            fully_shard(m, **kwargs)
            n += 1
    fully_shard(model, **kwargs)
    # accelerate leaves a prepared model alone: no DDP around the shards
    model._is_accelerate_prepared = True
    held = dist.gather(local_numel(model))  # every rank's share, logged by rank 0 (one line per rank, once per job)
    if dist.is_main():
        for r, (here, whole) in enumerate(held):
            log.info("FSDP2: rank %d holds %d of %d parameter elements (%.1f%%)", r, here, whole, 100.0 * here / max(whole, 1))
        log.info("FSDP2 over %d processes: %d blocks (%s) + root, %s", dist.world_size(), n, ", ".join(sorted(classes)) or "none",
                 "resharded after forward" if kwargs["reshard_after_forward"] else "kept gathered until backward")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model)."""
    here = whole = 0
    for p in model.parameters():
        whole += p.numel()
        here += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return here, whole


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (CPU tensors), {} elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

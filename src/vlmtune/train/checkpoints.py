"""Which `checkpoint-N` folder a run can safely resume from.

transformers' Trainer writes a checkpoint straight into `checkpoints/checkpoint-N` in this
order: weights (`adapter_model.safetensors` or `model.safetensors` / shards), `optimizer.pt`,
`scheduler.pt`, (`scaler.pt`), `rng_state.pth`, and `trainer_state.json` last; only then does
it delete older checkpoints beyond `save_total_limit`. A SIGKILL (or OOM kill, power cut of
the process, preemption) during that sequence leaves a folder that `get_last_checkpoint`
still picks, and resuming from it either crashes (missing file, truncated zip) or silently
mixes states. `last_good_checkpoint` picks the newest folder that is *complete*:

- `trainer_state.json` parses and its `global_step` is the N of the folder name (it is
  written last, so this alone rules out every kill inside `_save_checkpoint`);
- the weights are there and whole: every safetensors file's header parses and the file is
  exactly as long as the header says (a truncated write is shorter); an adapter also needs
  its `adapter_config.json`; a sharded model needs every shard its index names;
- `optimizer.pt`, `scheduler.pt`, `rng_state*.pth` (and `scaler.pt` when present) are
  present and are whole torch zip archives (the zip directory is written last, so a
  truncated file has none).

Newer incomplete folders are moved aside to `incomplete-checkpoint-N` (never deleted: they
may help a post-mortem), outside the `checkpoint-*` names that the Trainer resumes from
and rotates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("vlmtune")

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_PREFIX = "incomplete-"

PathLike = Union[str, os.PathLike]


def _safetensors_problem(path: Path) -> Optional[str]:
    """None if `path` is a whole safetensors file, else what is wrong with it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated (header cut)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has no tensor table"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + (max(ends) if ends else 0)
    if size != expected:
        return f"{path.name} is {'truncated' if size < expected else 'too long'} ({size} of {expected} bytes)"
    return None


def _torch_zip_problem(path: Path) -> Optional[str]:
    """None if `path` is a whole `torch.save` archive (zip: its directory is written last)."""
    try:
        with zipfile.ZipFile(path) as z:
            size = path.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                return f"{path.name} is truncated"
    except (OSError, zipfile.BadZipFile, ValueError):
        return f"{path.name} is truncated or not a torch archive"
    return None


def _json_problem(path: Path) -> tuple[Optional[str], object]:
    try:
        return None, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing", None
    except (OSError, ValueError):
        return f"{path.name} is truncated or unreadable", None


def _weights_problem(ckpt: Path) -> Optional[str]:
    adapter = ckpt / "adapter_model.safetensors"
    full = ckpt / "model.safetensors"
    index = ckpt / "model.safetensors.index.json"
    if adapter.exists():
        problem, _ = _json_problem(ckpt / "adapter_config.json")
        return problem or _safetensors_problem(adapter)
    if full.exists():
        return _safetensors_problem(full)
    if index.exists():
        problem, idx = _json_problem(index)
        if problem:
            return problem
        shards = sorted(set((idx or {}).get("weight_map", {}).values())) if isinstance(idx, dict) else []
        if not shards:
            return f"{index.name} names no shards"
        for shard in shards:
            if not (ckpt / shard).exists():
                return f"{shard} is missing"
            problem = _safetensors_problem(ckpt / shard)
            if problem:
                return problem
        return None
    if any(p.name.startswith("pytorch_model_fsdp") for p in ckpt.iterdir()):
        return None  # FSDP sharded state: written by torch.distributed.checkpoint, not checked here
    return "no model or adapter weights"


def checkpoint_problem(path: PathLike) -> Optional[str]:
    """None if the Trainer checkpoint folder `path` is complete, else a short reason.

    Files are checked in the order the Trainer writes them, so the reason names the first
    broken one: where the writing process died.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        return "not a folder"
    problem = _weights_problem(ckpt)
    if problem:
        return problem
    names = {p.name for p in ckpt.iterdir()}
    if not any(n.startswith("global_step") for n in names):  # DeepSpeed keeps optimizer/scheduler in its own folder
        optim = sorted(n for n in names if re.match(r"(rank\d+-of-\d+-)?optimizer\.(pt|bin)(_\d+)?$", n) or n.startswith("optimizer_"))
        if not optim:
            return "optimizer.pt is missing"
        problem = next((p for n in optim if n.endswith(".pt") and (p := _torch_zip_problem(ckpt / n))), None)
        if problem:
            return problem
        if "scheduler.pt" not in names:
            return "scheduler.pt is missing"
    for name in ("scheduler.pt", "scaler.pt"):
        if name in names:
            problem = _torch_zip_problem(ckpt / name)
            if problem:
                return problem
    rng = sorted(n for n in names if re.match(r"rng_state(_\d+)?\.pth$", n))
    if not rng:
        return "rng_state.pth is missing"
    problem = next((p for n in rng if (p := _torch_zip_problem(ckpt / n))), None)
    if problem:
        return problem
    # written last: its presence alone rules out a kill anywhere above
    problem, state = _json_problem(ckpt / "trainer_state.json")
    if problem:
        return problem
    step = state.get("global_step") if isinstance(state, dict) else None
    m = _CHECKPOINT_RE.match(ckpt.name)
    if not isinstance(step, int) or (m and int(m.group(1)) != step):
        return f"trainer_state.json says global_step={step!r}"
    return None


def list_checkpoints(folder: PathLike) -> list[Path]:
    """`checkpoint-N` folders in `folder`, newest (largest N) first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _move_aside(ckpt: Path) -> Path:
    target = ckpt.with_name(INCOMPLETE_PREFIX + ckpt.name)
    k = 1
    while target.exists():  # killed twice while writing the same step
        k += 1
        target = ckpt.with_name(f"{INCOMPLETE_PREFIX}{ckpt.name}.{k}")
    os.replace(ckpt, target)
    return target


def last_good_checkpoint(folder: PathLike, move_aside: bool = True) -> Optional[str]:
    """The newest complete `checkpoint-N` in `folder` (a path string, like transformers'
    `get_last_checkpoint`), or None.

    Incomplete checkpoints newer than it are moved aside to `incomplete-checkpoint-N` (with
    `move_aside`), each with one log line, so that neither this run's resume nor the Trainer's
    checkpoint rotation ever sees them again. Older incomplete ones (a kill while rotation
    was deleting them) are left for the rotation to finish deleting.
    """
    checkpoints = list_checkpoints(folder)
    for i, ckpt in enumerate(checkpoints):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        fallback = next((c for c in checkpoints[i + 1:] if checkpoint_problem(c) is None), None)
        then = f"resuming from {fallback.name}" if fallback else "no complete checkpoint left, starting from step 0"
        if move_aside:
            moved = _move_aside(ckpt)
            log.warning("checkpoint %s is incomplete (%s), probably killed while saving: moved it to %s; %s", ckpt, problem, moved.name, then)
        else:
            log.warning("checkpoint %s is incomplete (%s); %s", ckpt, problem, then)
    return None

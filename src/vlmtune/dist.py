"""Which process am I, and agreeing across processes (torchrun / accelerate launch).

A single process is a world of one: every function here is then a cheap no-op, so callers
never branch on "am I distributed". Under a launcher (WORLD_SIZE > 1 in the environment) the
process group is started through accelerate's `PartialState` -- the same state the Trainer
uses later, so there is exactly one process group with one backend (gloo on CPU, nccl on
GPUs).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """True when a launcher started several processes (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the launcher's process group (idempotent; nothing to do in a single process)."""
    if launched() and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    if _active():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs."""
    return rank() == 0


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj`, on every rank (a picklable object)."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank: all ranks take the same branch."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())

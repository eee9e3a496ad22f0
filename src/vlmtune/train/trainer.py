"""The SFT trainer: transformers' `Trainer` with our mixins.

Each addition lives in its own file as a mixin that any `transformers.Trainer` subclass can
compose (TRL's trainers included): part-wise optimizer groups (`optim.py`), the
non-finite guard with its step hooks (`guard.py`), a clean stop on SIGTERM / Ctrl-C
(`preempt.py`) and checkpoints that resume what was saved, FSDP2-sharded or not
(`checkpointing.py`). `compose(base)`
builds such a class.
"""

from __future__ import annotations

from transformers import Trainer

from .checkpointing import CheckpointMixin
from .guard import NonFiniteGuardMixin
from .loss import TokenMeanLossMixin
from .optim import PartwiseOptimizerMixin
from .preempt import PreemptionMixin


def compose(base: type) -> type:
    """`base` (a `transformers.Trainer` subclass) with vlmtune's mixins in front of it.

    Constructor keywords added: `part_map`, `part_plan` (optimizer groups), `nan_policy`,
    `sample_ids`, `run_label` (the guard).
    """
    return type(f"Vlm{base.__name__}", (PartwiseOptimizerMixin, NonFiniteGuardMixin, PreemptionMixin, CheckpointMixin, base), {"__module__": __name__})


class VlmTrainer(TokenMeanLossMixin, compose(Trainer)):
    """The supervised fine-tuning trainer (`train/sft.py`): the mixins above, and the loss as
    a mean over every supervised token of an optimizer step (`loss.py`; SFT only: an RL
    trainer brings its own loss)."""

"""The SFT trainer: transformers' `Trainer` with our mixins.

Each addition lives in its own file as a mixin that any `transformers.Trainer` subclass can
compose (TRL's trainers included): part-wise optimizer groups (`optim.py`), the
non-finite guard with its step hooks (`guard.py`), a clean stop on SIGTERM / Ctrl-C
(`preempt.py`), checkpoints that resume what was saved, FSDP2-sharded or not
(`checkpointing.py`), step metrics (tokens/s, padding, MFU: `throughput.py`) and length-grouped batches
(`sampling.py`). `compose(base)`
builds such a class.
"""

from __future__ import annotations

from transformers import Trainer

from .checkpointing import CheckpointMixin
from .guard import NonFiniteGuardMixin
from .loss import TokenMeanLossMixin
from .optim import PartwiseOptimizerMixin
from .packing import PackedBatchMixin
from .preempt import PreemptionMixin
from .sampling import LengthGroupedMixin
from .throughput import ThroughputMixin


def compose(base: type) -> type:
    """`base` (a `transformers.Trainer` subclass) with vlmtune's mixins in front of it.

    Constructor keywords added: `part_map`, `part_plan` (optimizer groups), `nan_policy`,
    `sample_ids`, `run_label` (the guard), `image_token_id` (step metrics, `throughput.py`),
    `sample_lengths` (length-grouped batches, `sampling.py`).
    """
    return type(f"Vlm{base.__name__}", (PartwiseOptimizerMixin, NonFiniteGuardMixin, PreemptionMixin, CheckpointMixin, ThroughputMixin, LengthGroupedMixin, base),
                {"__module__": __name__})


class VlmTrainer(PackedBatchMixin, TokenMeanLossMixin, compose(Trainer)):
    """The supervised fine-tuning trainer (`train/sft.py`): the mixins above, and the loss as
    a mean over every supervised token of an optimizer step (`loss.py`; SFT only: an RL
    trainer brings its own loss), and packed rows' attention masks (`packing.py`)."""

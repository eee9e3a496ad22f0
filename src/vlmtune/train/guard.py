"""The non-finite guard and the step hooks, as a mixin for any `transformers.Trainer`
subclass (ours, TRL's).

- A NaN/inf loss or gradient never reaches the weights. `nan_policy: stop` raises
  `NonFiniteLoss` (one line naming the optimizer step and the samples) before the update, so
  the last checkpoint stays the last good state; `skip_batch` drops that step's update
  (gradients set to None: the optimizer leaves weights *and* moments untouched, the LR
  schedule and step counter still advance) and records it in `state.log_history`, which
  checkpoints persist across resumes.
- Every rank takes the same decision: each rank checks its own losses and gradient shards,
  then one all-reduce says whether any rank saw a problem, and the sample ids of every rank
  are gathered for the message. Without that, one rank would stop (or skip) while the
  others waited for it in the next collective.
- No optimizer step past `max_steps` (see `StepHooks`), and losses logged at every
  save/evaluation so a resumed run's loss history equals an uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .. import dist
from ..errors import UserError
from ..io import fsync_dir, fsync_tree
from .checkpoints import last_good_checkpoint
from .samples import SAMPLE_ID_COLUMN, SAMPLE_INDEX_KEY

log = logging.getLogger("vlmtune")


class NonFiniteLoss(UserError):
    """Training met a NaN/inf loss or gradient under `nan_policy: stop`."""


class NothingLeftToTrain(Exception):
    """Raised at the start of an optimizer step past `max_steps` (see `StepHooks`)."""


def _local(g: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (an FSDP2 DTensor's local shard; a plain tensor as is)."""
    return g.to_local() if hasattr(g, "to_local") else g


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """Every entry of this rank's gradients is finite. The max-abs norm is NaN/inf exactly
    when some entry is, and (unlike the 2-norm) cannot overflow on large finite gradients."""
    local = [_local(g) for g in grads]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(local, norm_type=float("inf"))))
    return bool(torch.stack([torch.isfinite(g).all() for g in local]).all())


def _step_hooks_callback(trainer: Any):
    from transformers import TrainerCallback

    class StepHooks(TrainerCallback):
        """Per-step hooks (callbacks are the Trainer's public extension points).

        - step begin: forget the previous step's samples / problem, and refuse a step past
          `max_steps`: resumed from the final checkpoint of a run whose last step falls
          mid-epoch (a kill after training, while outputs were being written), the Trainer
          (transformers 5.x) would run the rest of that epoch's first step again, one update
          more than an uninterrupted run;
        - before `optimizer.step()`: the non-finite guard (stop, or drop the update);
        - log at every save/evaluation and at the last step. The Trainer logs the *mean* loss
          since its last log, and a resumed Trainer starts that window at the checkpoint's
          step; logging at every checkpoint makes each window start at a checkpoint or a
          logging step in an uninterrupted run too, so a resumed run's loss history (and its
          final loss, the last window) equals an uninterrupted run's entry for entry.
        """

        def on_step_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise NothingLeftToTrain()
            trainer._step_samples = []
            trainer._step_problem = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            trainer._guard_update()

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_evaluate or state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_save(self, args, state, control, **kwargs):
            # the Trainer writes checkpoints without fsync: make this one survive a power cut
            # before training goes on as if it were safe
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and ckpt.is_dir():
                fsync_tree(ckpt)
                fsync_dir(ckpt.parent)

        def on_epoch_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_evaluate:
                control.should_log = True
            return control

    return StepHooks()


class NonFiniteGuardMixin:
    """Mixin for a `transformers.Trainer` subclass: the non-finite guard and step hooks.

    Constructor keywords: `nan_policy` ("stop" | "skip_batch"), `sample_ids` (`sample_ids[i]`
    names dataset index i; batches carry indices, see `samples.IndexedDataset`) and
    `run_label` (how messages name the run).
    """

    def __init__(self, *args: Any, nan_policy: str = "stop", sample_ids: Optional[list[str]] = None,
                 run_label: str = "training", **kwargs: Any):
        self._nan_policy = nan_policy
        self._sample_ids = sample_ids
        self._run_label = run_label
        self._step_samples: list[str] = []
        self._step_problem: Optional[tuple[str, list[str]]] = None
        super().__init__(*args, **kwargs)
        self.add_callback(_step_hooks_callback(self))

    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train`, or None when the checkpoint it resumed from already ends the
        run (its weights and state are then loaded and nothing else happens)."""
        try:
            return super().train(*args, **kwargs)
        except NothingLeftToTrain:
            self.is_in_train = False
            log.info("%s: the checkpoint is at the final step %d; nothing left to train", self._run_label, self.state.global_step)
            return None

    def _ids(self, index: Optional[torch.Tensor]) -> list[str]:
        if index is None:
            return []
        idx = index.tolist()
        return [self._sample_ids[i] for i in idx] if self._sample_ids is not None else [f"#{i}" for i in idx]

    def _batch_ids(self, inputs: Any) -> list[str]:
        """Sample ids of a training batch. SFT: a dict whose `SAMPLE_INDEX_KEY` is popped
        before the model sees it. TRL's GRPO: a list of dataset rows (each prompt repeated
        per generation), named by their `sample_id` column."""
        if isinstance(inputs, dict):
            return self._ids(inputs.pop(SAMPLE_INDEX_KEY, None))
        if isinstance(inputs, (list, tuple)):
            return list(dict.fromkeys(str(r[SAMPLE_ID_COLUMN]) for r in inputs if isinstance(r, dict) and SAMPLE_ID_COLUMN in r))
        return []

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = self._batch_ids(inputs)
        self._step_samples.extend(i for i in ids if i not in self._step_samples)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One host sync per micro-batch; the Trainer's own NaN/inf logging filter already
        # makes the same one, so this costs no extra stall.
        if self._step_problem is None and not bool(torch.isfinite(loss).all()):
            self._step_problem = (f"loss is {loss.float().mean().item()}", ids)
        return loss

    def _stop(self, what: str, ids: list[str]) -> None:
        step = self.state.global_step + 1
        last = last_good_checkpoint(self.args.output_dir, move_aside=False) if os.path.isdir(self.args.output_dir) else None
        kept = (f"the last good checkpoint {Path(last).name} is kept and a rerun resumes from it" if last
                else "no checkpoint was written yet")
        raise NonFiniteLoss(
            self._run_label,
            f"{what} at optimizer step {step} (epoch {int(self.state.epoch or 0) + 1}) on samples {', '.join(ids) or '(unknown)'}; "
            f"training stopped before updating the weights, {kept}",
            "check those samples, lower training.learning_rate / max_grad_norm, or set training.nan_policy: skip_batch",
        )

    def _guard_update(self) -> None:
        """Before `optimizer.step()`: refuse or drop an update from non-finite values, on
        every rank alike."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        problem = self._step_problem
        # Under fp16 a GradScaler owns overflowing gradients: it skips that step itself and
        # lowers its scale, a routine event, not a reason to stop.
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if problem is None and params and not scaled and not grads_finite([p.grad for p in params]):
            # finite losses but a non-finite gradient (overflow in backward): no single
            # micro-batch to blame, so name every sample of the step
            problem = ("gradient is not finite", self._step_samples)
        if not dist.any_rank(problem is not None):
            return
        # Some rank saw a problem: name what every rank saw (a rank whose own values were
        # finite received the bad gradient through the all-reduce).
        seen = [p for p in dist.gather(problem) if p is not None]
        what = seen[0][0] if seen else "gradient is not finite"
        ids = [i for _, rank_ids in seen for i in rank_ids]
        if self._nan_policy == "stop":
            self._stop(what, ids)
        for p in params:
            p.grad = None  # optimizers skip parameters without a gradient: no update, moments kept
        step = self.state.global_step + 1
        self.state.log_history.append({"nan_skipped_step": step, "reason": what, "samples": list(ids),
                                       "epoch": self.state.epoch, "step": step})
        if dist.is_main():
            log.warning("%s: %s at optimizer step %d on samples %s: update skipped (training.nan_policy: skip_batch)",
                        self._run_label, what, step, ", ".join(ids) or "(unknown)")

"""Stop cleanly on SIGTERM (cluster preemption, `kill`, torchrun shutting down) and Ctrl-C.

A mixin for any `transformers.Trainer` subclass. While `train()` runs, SIGTERM and SIGINT
only raise a flag. At the end of the current optimizer step every rank learns whether any rank
got a signal (one all-reduce: all ranks stop at the same step), the Trainer writes a checkpoint
of that step and stops, and `train()` raises `Preempted`. The CLI prints one line saying
how to resume and exits with 128 + the signal number. Rerunning the same command resumes from
that checkpoint and ends where an uninterrupted run ends.

A second Ctrl-C while the step finishes interrupts at once (KeyboardInterrupt): nothing is
written then, and the previous checkpoint stays the last one.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

from .. import dist
from ..errors import UserError

log = logging.getLogger("vlmtune")


class Preempted(UserError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, where: str, problem: str, fix: str, signum: int):
        super().__init__(where, problem, fix)
        self.exit_code = 128 + signum


def _preemption_callback(trainer: Any):
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if dist.any_rank(trainer._stop_signal is not None):
                # save this step (and log it, so the loss windows of the resumed run line up)
                control.should_save = True
                control.should_log = True
                control.should_training_stop = True
                trainer._stopped_at = state.global_step
            return control

    return StopOnSignal()


class PreemptionMixin:
    """Mixin for a `transformers.Trainer` subclass: SIGTERM / Ctrl-C save a checkpoint at the
    next step boundary, then `train()` raises `Preempted`."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._stop_signal: Optional[int] = None
        self._stopped_at: Optional[int] = None
        super().__init__(*args, **kwargs)
        self.add_callback(_preemption_callback(self))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum
        log.warning("received %s: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def train(self, *args: Any, **kwargs: Any):
        self._stop_signal = self._stopped_at = None
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                installed[sig] = signal.signal(sig, self._on_signal)
        try:
            out = super().train(*args, **kwargs)
        finally:
            for sig, old in installed.items():
                signal.signal(sig, old)
        if self._stopped_at is not None:
            sig = self._stop_signal or signal.SIGTERM
            name = signal.Signals(sig).name
            ckpt = f"checkpoint-{self._stopped_at}"
            raise Preempted(getattr(self, "_run_label", "training"),
                            f"stopped by {name} after optimizer step {self._stopped_at} of {self.state.max_steps}; {ckpt} was saved",
                            "rerun the same command to resume from it", sig)
        return out

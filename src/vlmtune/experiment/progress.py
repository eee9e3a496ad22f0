"""A live progress bar for the grid (run i of n, the current run's step, an ETA for the whole
grid) above the Trainer's own per-run bar. Off with VLMTUNE_NO_PROGRESS=1."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from .. import dist


class GridProgress:
    def __init__(self, n_runs: int):
        self.n_runs = n_runs
        # one bar per job, not per process: rank 0 draws it
        self.enabled = os.environ.get("VLMTUNE_NO_PROGRESS") != "1" and n_runs > 0 and dist.is_main()
        self.bar: Optional[Any] = None
        self.done_runs = 0
        self.name = ""
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_runs, desc="grid", unit="run", position=0, leave=True, dynamic_ncols=True)

    def start_run(self, k: int, name: str) -> None:
        self.name = name
        if self.bar is not None:
            self.bar.set_description(f"grid: run {k}/{self.n_runs} {name}")

    def end_run(self) -> None:
        self.done_runs += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def callback(self) -> Any:
        """A TrainerCallback that shows the current run's step and the grid's ETA."""
        from transformers import TrainerCallback

        grid = self

        class _Step(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.t0, self.step0 = time.time(), state.global_step

            def on_step_end(self, args, state, control, **kwargs):
                if grid.bar is None or not state.max_steps:
                    return
                done = state.global_step - self.step0
                per_step = (time.time() - self.t0) / max(done, 1)
                # remaining steps of this run plus, at this run's size, of the runs after it
                remaining = (state.max_steps - state.global_step) + state.max_steps * (grid.n_runs - grid.done_runs - 1)
                eta = per_step * remaining
                grid.bar.set_postfix_str(f"step {state.global_step}/{state.max_steps}, grid ETA {eta / 60:.1f} min", refresh=True)

        return _Step()

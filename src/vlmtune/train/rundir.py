"""The run directory: the one owner of its layout (seed 003's tree) and of how it is written.

    <output_dir>/<model>__<variant>/
        config.yaml               the run's resolved config (written before training)
        parameter_report.json     parameters by part, total and trainable
        checkpoints/checkpoint-N  Trainer checkpoints (resume)
        lora_adapter/             plain-peft adapter (when any part uses LoRA)
        final/                    merged model, loads with plain transformers
        metrics.json              losses, timings; written LAST: its presence says the
                                  outputs beside it are complete
        predictions.jsonl, generation_metrics.json   evaluation after training
        eval/<data file>/         `vlmtune evaluate --run` outputs
        logs/tensorboard/         `training.report_to` tensorboard event files (train/eval
                                  scalars; the final and generation metrics)
        logs/wandb/               wandb's run folders (offline unless asked otherwise)
        stage_<i>_<name>/         one such tree per stage of a staged run
    <output_dir>/mlruns/          the mlflow file store of every run (when MLFLOW_TRACKING_URI
                                  is not set)
    <output_dir>/logs/            the grid summary's tensorboard/ and wandb/ (`vlmtune run`)

(docs/loggers.md: what each logger receives and how to read it.)

Rules every writer follows:
- only rank 0 writes (`dist.is_main`); the other ranks wait at a barrier where they need
  what rank 0 wrote;
- files are written atomically (`io.atomic_write_*`); output folders are built beside their
  target and swapped in (`save_dir_atomically`), so a kill never leaves a half-written one;
- `prepare()` repairs what a kill left (a half-done swap, stale temp files) before a run
  continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .. import dist
from ..errors import UserError
from ..config import Config, LoraConfig, ModelConfig
from ..io import atomic_write_json, atomic_write_yaml, fsync_dir, fsync_tree, read_json, remove_stale_temp_files
from .checkpoints import last_good_checkpoint

CONFIG = "config.yaml"
PARAMETER_REPORT = "parameter_report.json"
CHECKPOINTS = "checkpoints"
LORA_ADAPTER = "lora_adapter"
FINAL = "final"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
GENERATION_METRICS = "generation_metrics.json"
EVAL = "eval"
LOGS = "logs"
TENSORBOARD = "tensorboard"
MLRUNS = "mlruns"


def mlflow_store(output_dir: Union[str, os.PathLike]) -> Path:
    """The default mlflow file store: one per `output_dir`, shared by its runs."""
    return Path(output_dir) / MLRUNS


def grid_logs(output_dir: Union[str, os.PathLike]) -> Path:
    """Where the loggers of a grid's summary (`vlmtune run`) write, beside the run directories."""
    return Path(output_dir) / LOGS


def save_dir_atomically(path: Path, save: Callable[[Path], None]) -> None:
    """Call `save(tmp)` then swap `tmp` into `path`: no half-written output directory.

    A directory cannot be renamed over a non-empty one, so the swap is two renames
    (`path` -> `.path.old`, `tmp` -> `path`); `recover_swapped_dir` undoes a kill between
    them. Until `save` returns, the previous `path` is untouched.
    """
    save_dirs_atomically([(path, save)])


def save_dirs_atomically(outputs: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Build every output beside its target first, then swap them all in: a failure while
    writing any of them (a full disk) leaves every previous output as it was, never a new
    adapter beside an old merged model."""
    tmps = []
    try:
        for path, save in outputs:
            tmp = path.with_name(f".{path.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmps.append(tmp)
            save(tmp)
            fsync_tree(tmp)  # durable before it replaces anything: a power cut cannot leave a hollow final/
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)  # free what was written; the targets are untouched
        raise
    for path, _ in outputs:
        tmp = path.with_name(f".{path.name}.tmp")
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)


def recover_swapped_dir(path: Path) -> None:
    """Undo what a kill inside `save_dir_atomically` left: a complete previous `path` moved to
    `.path.old` but not replaced is moved back; a `.path.tmp` (maybe partial) is removed."""
    old = path.with_name(f".{path.name}.old")
    tmp = path.with_name(f".{path.name}.tmp")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)  # the swap finished; only the cleanup was cut
        else:
            os.replace(old, path)
    if tmp.exists():
        shutil.rmtree(tmp)


def check_writable(folder: Path, key: str = "output_dir") -> None:
    """Refuse, before anything trains, an output folder that cannot be created or written:
    a probe file is created (and removed) in the folder or, while it does not exist yet, in
    its nearest existing parent. Nothing is left behind."""
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UserError(key, f"{folder} cannot be created: {probe_in} is a file", "choose another output_dir")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vlmtune-write-probe.", dir=probe_in)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        what = "is read-only" if probe_in == folder else f"cannot be created in {probe_in}"
        raise UserError(key, f"{folder} {what} ({e.strerror})", "choose a writable output_dir (or --output-dir), or fix its permissions") from None


def _is_disk_full(e: BaseException) -> bool:
    """Out of space or quota. torch.save and safetensors report it in their own words."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "file write failed" in text


class RunDir:
    """One run's directory. Paths are properties; writes go through the methods."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- paths -----------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def parameter_report(self) -> Path:
        return self.path / PARAMETER_REPORT

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def lora_adapter(self) -> Path:
        return self.path / LORA_ADAPTER

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def generation_metrics(self) -> Path:
        return self.path / GENERATION_METRICS

    def eval_dir(self, data_name: str) -> Path:
        return self.path / EVAL / data_name

    @property
    def logs(self) -> Path:
        """The loggers' folder (`training.report_to`): wandb's runs go here."""
        return self.path / LOGS

    @property
    def tensorboard(self) -> Path:
        return self.logs / TENSORBOARD

    def stage(self, index: int, name: str) -> "RunDir":
        """Stage `index` (1-based) of a staged run: a full run tree of its own."""
        return RunDir(self.path / f"stage_{index}_{name}")

    # -- state -----------------------------------------------------------------------------
    def is_trained(self) -> bool:
        return self.metrics.is_file()

    def is_finished(self, wants_eval: bool) -> bool:
        return self.is_trained() and (not wants_eval or self.generation_metrics.is_file())

    def has_model(self) -> bool:
        return (self.final / "config.json").is_file()

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics)

    def read_generation_metrics(self) -> dict[str, Any]:
        return read_json(self.generation_metrics)

    def read_parameter_report(self) -> dict[str, Any]:
        return read_json(self.parameter_report)

    # -- writing (rank 0) --------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder and repair what a kill left; rank 0 does it, the others wait."""
        if dist.is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            for out in (self.lora_adapter, self.final):
                recover_swapped_dir(out)
            remove_stale_temp_files(self.path)
        dist.barrier()

    def write_json(self, path: Path, obj: Any) -> None:
        if dist.is_main():
            atomic_write_json(path, obj)

    def write_yaml(self, path: Path, obj: Any) -> None:
        if dist.is_main():
            atomic_write_yaml(path, obj)

    def save_dir(self, path: Path, save: Callable[[Path], None]) -> None:
        """Rank 0 builds `path` through `save(tmp)` and swaps it in; the others wait."""
        if dist.is_main():
            save_dir_atomically(path, save)
        dist.barrier()

    @contextlib.contextmanager
    def disk_errors(self, label: str, what: str) -> Iterator[None]:
        """Turn a full disk while writing `what` into one line that says what is kept."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if not _is_disk_full(e):
                raise
            last = last_good_checkpoint(self.checkpoints, move_aside=False) if self.checkpoints.is_dir() else None
            kept = f"the rerun resumes from {Path(last).name}" if last else "nothing was trained yet"
            raise UserError(label, f"no space left on the device while writing {what} under {self.path}; earlier outputs are intact",
                            f"free disk space and rerun the same command ({kept})") from None

    def move_aside(self) -> Optional[Path]:
        """`vlmtune train --fresh`: rename this run's directory to `<name>.old-<time>` beside it
        (nothing is deleted) so the run starts over; returns the new path, None when there
        was nothing to move."""
        if not self.path.exists() or not dist.is_main():
            return None
        import time

        dest = self.path.with_name(f"{self.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        k = 1
        while dest.exists():
            dest = dest.with_name(f"{self.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{k}")
            k += 1
        self.path.rename(dest)
        fsync_dir(self.path.parent)
        return dest

    def resume_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint (as a path string), the same on every rank.

        Rank 0 moves incomplete ones aside (see `checkpoints.last_good_checkpoint`); every
        rank then resumes from rank 0's answer.
        """
        found = last_good_checkpoint(self.checkpoints) if dist.is_main() else None
        return dist.broadcast(found)


def run_name(model: ModelConfig, variant: LoraConfig) -> str:
    """`<model>__<variant>`: the run directory's name under `output_dir`."""
    return f"{model.name}__{variant.name}"


def resolved_run_config(cfg: Config, mcfg: ModelConfig, variant: LoraConfig) -> dict[str, Any]:
    """The config of one run as written to its `config.yaml`: one model, one variant, and every
    path absolute as this run resolved it (`Config.with_absolute_paths`; output_dir is the run
    directory's parent), so `vlmtune train|preview RUN/config.yaml` and `vlmtune evaluate --run
    RUN` work from any folder and continue this same run directory."""
    out = dataclasses.replace(cfg, models=[mcfg], lora_variants=[variant]).with_absolute_paths().to_dict()
    # `train --resume-from` says where this invocation starts, not what the run is: a saved
    # config that kept it would resume every later rerun from that old checkpoint
    out["training"]["resume_from"] = None
    return out

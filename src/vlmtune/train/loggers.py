"""The `training.report_to` loggers -- tensorboard, wandb, mlflow (the `loggers` extra): the
check that each is installed, where each writes, and what reaches it besides the Trainer's
own logging. docs/loggers.md is the user's side of this module.

- Before anything loads (`check_installed`, from the recipes' preflight and `vlmtune check`):
  a logger asked for but not installed is one line naming the extra.
- During training, transformers' own callbacks (TensorBoardCallback, WandbCallback,
  MLflowCallback) log every `logging_steps` (loss, learning rate, grad norm) and every
  evaluation (eval loss). vlmtune only decides where they write: it opens the run's wandb
  run and mlflow run itself (the callbacks log into an active run rather than start their
  own) and points tensorboard into the run directory.
- After training and evaluation (`LoggedRun.log_values`, from experiment/): the run's final
  metrics (metrics.json), its generation metrics and its resolved config; for `vlmtune run`,
  the grid summary too, as a logged run of its own.

Where (defaults; each logger's own environment variable wins):

    tensorboard  <run>/logs/tensorboard/             TENSORBOARD_LOGGING_DIR
    wandb        <run>/logs/wandb/<offline-run-...>/  WANDB_DIR; offline unless WANDB_MODE,
                                                      WANDB_API_KEY or a `wandb login` says online
    mlflow       file store <output_dir>/mlruns,      MLFLOW_TRACKING_URI,
                 experiment = experiment_name         MLFLOW_EXPERIMENT_NAME

Only rank 0 logs. Other transformers integrations (comet_ml, clearml, ...) pass through to
the Trainer as they are, with the same installed check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlparse

from .. import dist
from ..config import Config
from ..errors import UserError
from .rundir import RunDir, mlflow_store

log = logging.getLogger("vlmtune")

MANAGED = ("tensorboard", "wandb", "mlflow")
"""The loggers vlmtune places and sends its final metrics to (the `loggers` extra)."""
EXTRA_FIX = "pip install 'vlmtune[loggers]'"
# Other transformers integrations: (module that must be importable, what to install).
_OTHERS = {"azure_ml": ("azureml", "azureml-core"), "clearml": ("clearml", "clearml"), "codecarbon": ("codecarbon", "codecarbon"),
           "comet_ml": ("comet_ml", "comet-ml"), "dagshub": ("dagshub", "dagshub"), "dvclive": ("dvclive", "dvclive"),
           "flyte": ("flytekit", "flytekit"), "neptune": ("neptune", "neptune"), "swanlab": ("swanlab", "swanlab"),
           "trackio": ("trackio", "trackio")}


# -- which loggers, and are they installed ----------------------------------------------------
def requested(report_to: Union[str, list[str], None]) -> list[str]:
    """The integrations `report_to` names: 'none' none, 'all' those installed (as transformers
    expands it)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    return [n for n in dict.fromkeys(names) if n != "none"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(report_to: Union[str, list[str], None], key: str = "training.report_to") -> list[str]:
    """Refuse a logger that is not installed, in one line naming what to install; returns the
    requested loggers. Cheap (no import): `vlmtune check` and every recipe's preflight call it
    before anything loads."""
    names = requested(report_to)
    for name in names:
        if name == "tensorboard":  # transformers' callback writes with tensorboard or tensorboardX
            ok, fix = _installed("tensorboard") or _installed("tensorboardX"), EXTRA_FIX
        elif name in MANAGED:
            ok, fix = _installed(name), EXTRA_FIX
        elif name in _OTHERS:
            ok, fix = _installed(_OTHERS[name][0]), f"pip install {_OTHERS[name][1]}"
        else:
            continue
        if not ok:
            raise UserError(key, f"{name} is not installed", f"{fix}, or drop {name} from {key}")
    return names


def preflight(cfg: Config, key: str = "training.report_to") -> None:
    """`check_installed`, and the environment mlflow reads when it is imported (the Trainer
    imports it as it builds its callbacks): see `_mlflow_environment`."""
    if "mlflow" in check_installed(cfg.training.report_to, key):
        _mlflow_environment(cfg)


# -- where --------------------------------------------------------------------------------------
def tracker_run_name(cfg: Config, label: str) -> str:
    """The run's name in wandb and mlflow (also the Trainer's `run_name`): `training.run_name`,
    default `<experiment>/<model>__<variant>`."""
    return cfg.training.run_name or f"{cfg.experiment_name}/{label}"


def mlflow_tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else the file store `<output_dir>/mlruns` (an absolute file: URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow_store(cfg.resolved_output_dir()).resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a bare path (C:\\ on Windows)


def _mlflow_environment(cfg: Config) -> None:
    """mlflow >= 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: vlmtune sets it
    when the tracking URI is one, so the default store works without the user knowing the flag.
    mlflow's usage telemetry (a network call from `import mlflow` on) stays off unless
    MLFLOW_DISABLE_TELEMETRY says otherwise: a run with a local store stays local. An explicit
    setting of either variable is kept."""
    if _is_file_store(mlflow_tracking_uri(cfg)):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _netrc_has_wandb_login() -> bool:
    """`wandb login` stores the API key in the netrc file (NETRC, else ~/.netrc) under the
    API host; read with the standard library, no network."""
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(os.path.isfile(path) and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; else online when an API key is configured (WANDB_API_KEY or `wandb
    login`), offline otherwise: a run never waits for a login prompt or a network."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb_login() else "offline"


# -- one logged run -------------------------------------------------------------------------------
def numeric_leaves(obj: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every finite number of a nested dict (lists skipped), keyed `prefix/key/subkey`."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(numeric_leaves(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def _flat_params(obj: Any, prefix: str) -> dict[str, str]:
    """A config as mlflow params: `config/training/learning_rate` -> '0.001' (lists by index)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        items = ((str(i), x) for i, x in enumerate(obj))
    else:
        return {prefix: str(obj)}
    out: dict[str, str] = {}
    for k, v in items:
        out.update(_flat_params(v, f"{prefix}/{k}"))
    return out


def _mlflow_key(key: str) -> str:
    """mlflow names allow letters, digits, `_-. :/` and at most 250 characters (as
    transformers' MLflowCallback sanitizes metric names)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)[:250]


def _status(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", 1) != 1:  # Ctrl-C, SIGTERM stop
        return "KILLED"
    return "FAILED"


class LoggedRun:
    """One run in the requested loggers, on rank 0: a wandb run and an mlflow run (opened on
    first use: `open`), and the tensorboard folder its values go to (`log_values`).

    A training run's Trainer logs into the same wandb/mlflow run (see `RunLoggers`); the grid
    summary is a LoggedRun of its own."""

    def __init__(self, cfg: Config, names: list[str], run_name: str, logs_dir: Path, config: dict[str, Any]):
        self.cfg = cfg
        self.names = [n for n in names if n in MANAGED]
        self.run_name = run_name
        self.logs_dir = Path(logs_dir)
        self.config = config
        self.wandb_run: Any = None
        self.mlflow_run_id: Optional[str] = None
        self.opened = False
        self._config_logged = False

    @property
    def tensorboard_dir(self) -> Path:
        return self.logs_dir / "tensorboard"

    def open(self) -> None:
        """Start the wandb and mlflow runs (rank 0, once); say where each logger writes."""
        if self.opened or not self.names or not dist.is_main():
            return
        self.opened = True
        where = []
        if "tensorboard" in self.names:
            where.append(f"tensorboard -> {os.environ.get('TENSORBOARD_LOGGING_DIR') or self.tensorboard_dir}")
        if "wandb" in self.names:
            where.append(self._open_wandb())
        if "mlflow" in self.names:
            where.append(self._open_mlflow())
        log.info("%s: %s", self.run_name, "; ".join(where))

    def _open_wandb(self) -> str:
        import wandb

        mode = wandb_mode()
        wdir = os.environ.get("WANDB_DIR") or str(self.logs_dir)
        Path(wdir).mkdir(parents=True, exist_ok=True)
        # console off: vlmtune's own stdout/stderr stay untouched (WANDB_CONSOLE to change it)
        self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT") or self.cfg.experiment_name, name=self.run_name,
                                    dir=wdir, mode=mode, config={"vlmtune": self.config},
                                    settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off")))
        run_dir = getattr(self.wandb_run, "dir", None)  # <run folder>/files
        return f"wandb ({mode}) -> {Path(run_dir).parent if run_dir else wdir}"

    def _open_mlflow(self) -> str:
        _mlflow_environment(self.cfg)
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri = mlflow_tracking_uri(self.cfg)
        mlflow.set_tracking_uri(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.cfg.experiment_name
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=self.run_name)
        self.mlflow_run_id = run.info.run_id
        # the config as params (searchable, comparable across runs) and whole as config.yaml;
        # the Trainer's callback adds TrainingArguments and the model config under their names
        params = list({_mlflow_key(k): v for k, v in _flat_params(self.config, "config").items() if len(v) <= MAX_PARAM_VAL_LENGTH}.items())
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(params[i: i + MAX_PARAMS_TAGS_PER_BATCH]))
        mlflow.log_dict(self.config, "config.yaml")
        return f"mlflow -> {uri} (experiment {experiment!r}, run {self.mlflow_run_id})"

    def log_values(self, values: dict[str, float], step: int, documents: Optional[dict[str, Any]] = None) -> None:
        """Final values (one number each) and documents (name -> JSON-able object) to every
        logger: tensorboard scalars at `step` and text, the wandb run's summary, mlflow
        metrics at `step` and artifacts. The config goes along the first time."""
        if not self.names or not dist.is_main():
            return
        self.open()
        docs = dict(documents or {})
        if not self._config_logged:
            docs = {"config.yaml": self.config, **docs}
            self._config_logged = True
        if "tensorboard" in self.names:
            self._tensorboard(values, step, docs)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)
        if self.mlflow_run_id is not None:
            import mlflow

            mlflow.log_metrics({_mlflow_key(k): v for k, v in values.items()}, step=step, run_id=self.mlflow_run_id)
            for name, doc in docs.items():
                if name != "config.yaml":  # logged when the run opened
                    mlflow.log_dict(doc, name, run_id=self.mlflow_run_id)

    def _tensorboard(self, values: dict[str, float], step: int, docs: dict[str, Any]) -> None:
        import json

        import yaml

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboardX only, as transformers' callback allows
            from tensorboardX import SummaryWriter
        writer = SummaryWriter(log_dir=os.environ.get("TENSORBOARD_LOGGING_DIR") or str(self.tensorboard_dir))
        try:
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            for name, doc in docs.items():
                text = yaml.safe_dump(doc, sort_keys=False) if name.endswith(".yaml") else json.dumps(doc, indent=2, default=str)
                # indented: tensorboard renders text as markdown, a code block keeps it verbatim
                writer.add_text(Path(name).stem, "\n".join("    " + line for line in text.splitlines()), step)
        finally:
            writer.close()

    def close(self, exc: Optional[BaseException] = None) -> None:
        """End the wandb and mlflow runs, as failed/killed when `exc` ended them."""
        if not self.opened:
            return
        self.opened = False
        status = _status(exc)
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish(exit_code=0 if status == "FINISHED" else 1)
        if self.mlflow_run_id is not None:
            import mlflow

            run_id, self.mlflow_run_id = self.mlflow_run_id, None
            while (active := mlflow.active_run()) is not None:  # a nested stage run left open first
                mlflow.end_run(status=status)
                if active.info.run_id == run_id:
                    break

    def __enter__(self) -> "LoggedRun":
        return self

    def __exit__(self, et: Any, exc: Optional[BaseException], tb: Any) -> None:
        self.close(exc)


class RunLoggers(LoggedRun):
    """A training run's loggers, from its first training step to its evaluation's metrics.

    Used as a context manager around everything a run does (experiment/grid.py), and passed
    to the recipe (`run_loggers=`, down to `logging_to`): every Trainer of the run (one, or one
    per stage) logs into the same wandb and mlflow run. Passed, not found in a module global,
    so what a recipe logs into is visible at its call and two runs in one process (threads,
    nested calls) cannot pick up each other's loggers. Nothing is written until training
    starts: a user error before that leaves no run folder."""

    def __init__(self, cfg: Config, rd: RunDir, label: str, config: dict[str, Any]):
        super().__init__(cfg, requested(cfg.training.report_to), tracker_run_name(cfg, label), rd.logs, config)
        self.rd = rd

    @contextlib.contextmanager
    def attached(self, trainer: Any, rd: RunDir) -> Iterator[None]:
        """Around `trainer.train()`: the run's loggers open, tensorboard writes into
        `rd`'s logs/tensorboard, and a stage (`rd` below the run's own folder) trains in a
        nested mlflow run named after its folder (each stage logs its own TrainingArguments)."""
        self.open()
        if "tensorboard" in self.names and dist.is_main():
            _point_tensorboard(trainer, rd.tensorboard)
        nested = self.mlflow_run_id is not None and rd.path != self.rd.path
        if nested:
            import mlflow

            mlflow.start_run(run_name=f"{self.run_name}/{rd.name}", nested=True)
        try:
            yield
        except BaseException as e:
            if nested:
                import mlflow

                mlflow.end_run(status=_status(e))
            raise
        if nested:
            import mlflow

            mlflow.end_run()


def _point_tensorboard(trainer: Any, folder: Path) -> None:
    """transformers' TensorBoardCallback writes to TENSORBOARD_LOGGING_DIR, else to an
    undocumented `<checkpoints>/runs/<date>_<host>/`: without the variable, the run's folder."""
    from transformers.integrations import TensorBoardCallback

    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.tb_writer is None:
            cb.logging_dir = str(folder)


@contextlib.contextmanager
def logging_to(trainer: Any, cfg: Config, rd: RunDir, label: str, config: dict[str, Any],
               run_loggers: Optional[RunLoggers] = None) -> Iterator[None]:
    """What a recipe wraps `trainer.train()` in: `run_loggers`, the loggers of the run being
    logged (opened by the grid and passed down through the recipe; the caller closes them), or
    -- None, a recipe called on its own -- loggers for this training only, closed here."""
    if run_loggers is not None:
        with run_loggers.attached(trainer, rd):
            yield
        return
    with RunLoggers(cfg, rd, label, config) as own, own.attached(trainer, rd):
        yield

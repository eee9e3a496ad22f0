"""`vlmtune run CONFIG --launcher ray [--address ADDR]`: each (model x variant) run of the grid
as one Ray task with the resources of `resources_per_run` (docs/distributed.md).

The driver (the `vlmtune run` process) does what the local loop does before anything loads
(`grid.prepare_grid`: precisions, metric names, the data gate) and skips the runs that finished
earlier (`grid.finished_summary`, the local loop's own test). Every other run becomes a task
that runs the local loop's per-run function (`grid._one_run`: train, then evaluate, into the
same run directory, resuming from its checkpoints). The task gets the config as a plain dict
(paths made absolute by the driver) and the checked data splits through Ray's object store,
and it returns the run's summary entry. A task that fails -- an error in the run, or its
worker process dying -- is retried once (from the run's checkpoints), then recorded as failed,
as the local loop records a failure. A `UserError` (a bad setting, a missing file) is recorded
at once: it would fail the same way again, after loading the model again. The driver writes
ablation_summary.json and report.html as the local launcher does (cli.cmd_run).

Every node must see the same files under the same paths (data, output_dir: a shared
filesystem) and have vlmtune installed. Each task runs in a fresh worker process
(`max_calls=1`): a run's GPU memory goes with it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional

from ..config import Config, config_from_dict
from ..errors import UserError
from ..train.rundir import run_name
from .grid import error_line, finished_summary, prepare_grid, select_runs

log = logging.getLogger("vlmtune")

ATTEMPTS = 2  # a failed task is retried once (not one that failed with a UserError)


def require_ray() -> Any:
    """The `ray` module, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError("--launcher ray", "Ray is not installed", "pip install 'vlmtune[ray]'") from None
    return ray


def run_task(cfg_dict: dict[str, Any], config_dir: Optional[str], name: str, splits: dict[str, Any],
             bad: dict[str, int], debug: bool = False) -> dict[str, Any]:
    """One run, inside a Ray worker: the local loop's per-run work. Never raises: an error is
    returned as a `failed` entry, with `retry` false for a `UserError` (deterministic: the
    driver reports it at once) and true otherwise (the driver retries it once). The driver
    pops `retry` and `traceback` before the entry reaches the summary."""
    from ..logs import setup_logging
    from .grid import _one_run

    setup_logging(debug)
    vlog = logging.getLogger("vlmtune")
    if not vlog.handlers:  # a Ray worker's root logger may drop INFO: vlmtune's lines go to stderr
        vlog.addHandler(logging.StreamHandler())
        vlog.propagate = False
    vlog.setLevel(logging.DEBUG if debug else logging.INFO)
    entry: dict[str, Any] = {"run": name}
    try:
        cfg = config_from_dict(cfg_dict, f"ray task {name}", config_dir)
        (i, m, v), = [r for r in select_runs(cfg) if run_name(r[1], r[2]) == name]
        entry.update(run_dir=str(cfg.resolved_output_dir() / name), model=m.name, variant=v.name)
        return _one_run(cfg, i, m, v, splits, bad, None, reuse=True)
    except Exception as e:  # noqa: BLE001 -- every error of a run is that run's failure
        return {**entry, "status": "failed", "error": error_line(e), "traceback": traceback.format_exc(),
                "retry": not isinstance(e, UserError)}


def _start_ray(ray: Any, address: Optional[str]) -> bool:
    """Connect to the cluster at `address`, or start a local instance; True when this process
    started (and so stops) it. An already initialised Ray (a test, a notebook) is used as is."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local instance: every CPU and GPU of this machine
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def _gpus_per_run(ray: Any, cfg: Config, address: Optional[str]) -> float:
    have = float(ray.cluster_resources().get("GPU", 0))
    want = cfg.resources_per_run.gpus
    if want is None:
        return 1.0 if have >= 1 else 0.0
    if want > have:
        if not address:
            raise UserError("resources_per_run.gpus", f"each run asks for {want:g} GPUs but this machine's Ray instance has {have:g}",
                            "lower resources_per_run.gpus (0 trains on CPU), or pass --address of a cluster with GPUs")
        log.warning("resources_per_run.gpus: each run asks for %g GPUs, the cluster has %g now: the tasks wait until it has them", want, have)
    return float(want)


def run_grid_ray(cfg: Config, only: Optional[str] = None, address: Optional[str] = None, debug: bool = False,
                 task: Optional[Callable[..., dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """The selected runs (grid order) through Ray; one summary entry per run, as `run_grid`
    with `keep_going` and `reuse` gives. `task` replaces `run_task` (tests: a task that fails
    once); it is called with the same arguments."""
    ray = require_ray()
    runs = select_runs(cfg, only=only)
    splits, bad = prepare_grid(cfg, runs)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for i, m, v in runs:
        name = run_name(m, v)
        try:
            done = finished_summary(cfg, m, v, splits)
        except UserError as e:  # a trained run with other settings: recorded, as the local loop does
            log.error("%s failed: %s", name, e.line())
            results[name] = {"run": name, "run_dir": str(cfg.resolved_output_dir() / name), "model": m.name,
                             "variant": v.name, "status": "failed", "error": e.line()}
            continue
        if done is not None:
            log.info("%s: finished earlier, reused (files untouched)", name)
            results[name] = done
        else:
            todo.append(name)
    if todo:
        started = _start_ray(ray, address)
        try:
            _run_tasks(ray, cfg, todo, splits, bad, address, debug, task or run_task, results)
        finally:
            if started:
                ray.shutdown()
    base = {run_name(m, v): {"run": run_name(m, v), "run_dir": str(cfg.resolved_output_dir() / run_name(m, v)),
                             "model": m.name, "variant": v.name} for _, m, v in runs}
    return [{**base[n], **results[n]} for n in base]


def _run_tasks(ray: Any, cfg: Config, todo: list[str], splits: dict[str, Any], bad: dict[str, int], address: Optional[str],
               debug: bool, task: Callable[..., dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    gpus = _gpus_per_run(ray, cfg, address)
    cpus = cfg.resources_per_run.cpus
    # retries are the driver's (it logs them and keeps the error); a fresh process per run
    remote = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=0, max_calls=1)(task)
    cfg_dict = cfg.with_absolute_paths().to_dict()  # plain data; the same paths on every node
    splits_ref = ray.put(splits)
    log.info("ray: %d run(s) as tasks of %g GPU(s) and %g CPU(s) each on %s", len(todo), gpus, cpus,
             ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items()) if k in ("CPU", "GPU")))

    def submit(name: str) -> Any:
        return remote.remote(cfg_dict, cfg.config_dir, name, splits_ref, bad, debug)

    pending = {submit(name): (name, 1) for name in todo}
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        name, attempt = pending.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # the worker died (out of memory, killed, node lost), or a task raised
            cause = getattr(e, "cause", None)
            cause = cause if isinstance(cause, Exception) else e
            res = {"run": name, "run_dir": str(cfg.resolved_output_dir() / name), "status": "failed",
                   "error": error_line(cause), "retry": not isinstance(cause, UserError)}
        retry = res.pop("retry", True)  # an entry without it (another task function): retried as before
        if res.get("status") == "failed":
            tb = res.pop("traceback", None)
            if tb:
                log.debug("%s", tb)
            if retry and attempt < ATTEMPTS:
                log.warning("%s failed (attempt %d of %d): %s; retrying", name, attempt, ATTEMPTS, res.get("error"))
                pending[submit(name)] = (name, attempt + 1)
                continue
            res["attempts"] = attempt
            log.error("%s failed: %s", name, res.get("error"))
        finished += 1
        log.info("[ray %d/%d] %s: %s", finished, len(todo), name, res.get("status"))
        results[name] = res

"""Run every model x LoRA variant of a config: train, then (if enabled) evaluate.

Runs are named `<model>__<variant>` and live under `output_dir` (seed 003's tree). The grid
is resumable run by run (`vlmtune run`, `reuse=True`):

- a trained run whose saved settings differ from the config's is reported as a failure rather
  than silently mixed into the summary;
- a finished run (`metrics.json`, and `generation_metrics.json` when evaluation is on) is
  reused, its files untouched; a run trained but not yet evaluated is only evaluated;
- an interrupted run resumes from its last complete checkpoint (train_run).

With `keep_going` (vlmtune run) a failing run is recorded with its error and the grid goes on.
`vlmtune train` trains every selected run (continuing from its checkpoints) and stops at the
first error.
"""

from __future__ import annotations

import functools
import logging
import traceback
from typing import Any, Optional

import yaml

from .. import dist
from ..config import Config, LoraConfig, ModelConfig, from_dict
from ..data.check import gate
from ..data.sources import Sample
from ..errors import UserError
from ..eval.generate import GenerationSettings, describe_weights, evaluate_samples
from ..train.loggers import RunLoggers, numeric_leaves
from ..train.rundir import RunDir, resolved_run_config, run_name
from ..train.grpo import grpo_run
from ..train.stages import describe_stages, preflight, train_staged

log = logging.getLogger("vlmtune")

# Settings that define a run's result; a finished run with different ones is not reused.
_RUN_KEYS = ("models", "lora_variants", "training", "visual_encoder_settings")


def select_runs(cfg: Config, model: Optional[str] = None, variant: Optional[str] = None,
                only: Optional[str] = None) -> list[tuple[int, ModelConfig, LoraConfig]]:
    """(model index, model, variant) for every selected run, models outer, variants inner."""
    models = [(i, m) for i, m in enumerate(cfg.models) if model is None or m.name == model]
    if model is not None and not models:
        raise UserError("--model", f"no model named {model!r} in the config", f"choose one of {', '.join(m.name for m in cfg.models)}")
    variants = [v for v in cfg.variants() if variant is None or v.name == variant]
    if variant is not None and not variants:
        raise UserError("--variant", f"no variant named {variant!r} in the config", f"choose one of {', '.join(v.name for v in cfg.variants())}")
    runs = [(i, m, v) for i, m in models for v in variants]
    if only is not None:
        runs = [r for r in runs if only in (run_name(r[1], r[2]), r[2].name, r[1].name)]
        if not runs:
            names = [run_name(m, v) for _, m, v in select_runs(cfg)]
            raise UserError("--only", f"no run, model or variant named {only!r}", f"runs: {', '.join(names)}")
    return runs


def eval_split(cfg: Config, splits: dict[str, Optional[list[Sample]]]) -> tuple[Optional[str], Optional[list[Sample]]]:
    order = ["test", "val"] if cfg.evaluation.split == "test" else ["val", "test"]
    for s in order:
        if splits.get(s):
            samples = splits[s]
            if cfg.evaluation.max_samples:
                samples = samples[: cfg.evaluation.max_samples]
            return s, samples
    return None, None


def _settings_differ(rd: RunDir, run_cfg: Config, m: ModelConfig, v: LoraConfig) -> list[str]:
    """Top-level sections of the run's saved config.yaml that differ from what this run would
    save (`resolved_run_config`: paths absolute). Like is compared with like: the saved config
    goes through the same path resolution (`Config.with_absolute_paths`, against this config's
    folder and the working directory), so a config.yaml saved with relative paths (before they
    were saved absolute) still matches a rerun of the same command from the same folder."""
    expected = resolved_run_config(run_cfg, m, v)
    try:
        saved = yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ["config.yaml (unreadable)"]
    if not isinstance(saved, dict):
        return ["config.yaml (not a mapping)"]
    try:
        saved_cfg = from_dict(Config, saved, "", str(rd.config))
    except UserError:
        pass  # keys this version does not know: compared as written
    else:
        saved_cfg.config_dir = run_cfg.config_dir
        saved = saved_cfg.with_absolute_paths().to_dict()
    return [k for k in _RUN_KEYS if saved.get(k) != expected.get(k)]


def _evaluate(run_cfg: Config, model: Any, encoder: Any, samples: list[Sample], rd: RunDir) -> Optional[dict[str, Any]]:
    """Generate and score on rank 0 (the only rank that holds the merged model); the other
    ranks wait for it and return None."""
    result = None
    if dist.is_main():
        bs = run_cfg.evaluation.batch_size or run_cfg.training.per_device_eval_batch_size
        result = evaluate_samples(model, encoder, samples, rd.path, bs, GenerationSettings.from_training(run_cfg.training),
                                  run_cfg.evaluation.metrics, model_desc=describe_weights(rd.final))
    dist.barrier()
    return result


def finished_summary(cfg: Config, m: ModelConfig, v: LoraConfig, splits: dict[str, Optional[list[Sample]]]) -> Optional[dict[str, Any]]:
    """The summary of a run that finished earlier with this config's settings (reused as it
    is, files untouched), or None when it still has work to do. A trained run whose saved
    settings differ is a UserError. The one test both launchers skip finished runs by."""
    name = run_name(m, v)
    run_cfg = cfg.for_variant(v)
    rd = RunDir(cfg.resolved_output_dir() / name)
    if not rd.is_trained():
        return None
    differ = _settings_differ(rd, run_cfg, m, v)
    if differ:
        raise UserError(str(rd), f"holds a trained run with different {', '.join(differ)} settings",
                        "delete or move that run directory, or give the changed variant a new name")
    split, samples = eval_split(run_cfg, splits)
    wants_eval = bool(run_cfg.evaluation.enabled and samples)
    if not rd.is_finished(wants_eval):
        return None
    summary: dict[str, Any] = {"run": name, "run_dir": str(rd), "model": m.name, "variant": v.name,
                               "status": "complete", "reused": True, "metrics": rd.read_metrics()}
    if wants_eval:
        summary.update(generation_metrics=rd.read_generation_metrics(), eval_split=split)
    return summary


def _one_run(cfg: Config, i: int, m: ModelConfig, v: LoraConfig, splits: dict[str, Optional[list[Sample]]],
             bad: dict[str, int], callbacks: Optional[list[Any]] = None, reuse: bool = True) -> dict[str, Any]:
    name = run_name(m, v)
    run_cfg = cfg.for_variant(v)
    rd = RunDir(cfg.resolved_output_dir() / name)
    split, samples = eval_split(run_cfg, splits)
    wants_eval = bool(run_cfg.evaluation.enabled and samples)
    summary: dict[str, Any] = {"run": name, "run_dir": str(rd), "model": m.name, "variant": v.name}
    if reuse and rd.is_trained():  # trained earlier
        finished = finished_summary(cfg, m, v, splits)
        if finished is not None:
            log.info("%s: finished earlier, reused (files untouched)", name)
            return finished
        metrics = rd.read_metrics()
        # Killed during evaluation: evaluate the saved model (its predictions resume).
        from ..eval.standalone import load_run

        log.info("%s: trained earlier; evaluating it", name)
        em = load_run(rd.path) if dist.is_main() else None
        with RunLoggers(run_cfg, rd, name, resolved_run_config(run_cfg, m, v)) as loggers:
            summary.update(status="complete", reused=False, metrics=metrics,
                           generation_metrics=_evaluate(run_cfg, em and em.model, em and em.encoder, samples, rd), eval_split=split)
            log_run_values(loggers, metrics, summary["generation_metrics"])
        return summary
    preflight(run_cfg, m, v, f"models[{i}]")
    # data.on_bad_sample: skip -- the run's metrics say how much data it did not see
    if run_cfg.grpo is not None:  # a grpo: section makes every run RL
        from ..eval.probe import visual_reliance_probe

        recipe = functools.partial(grpo_run, probe_factory=visual_reliance_probe)
    else:
        recipe = train_staged
    # report_to: one logged run from the first training step to the evaluation's metrics,
    # passed to the recipe, whose Trainer(s) log into it
    with RunLoggers(run_cfg, rd, name, resolved_run_config(run_cfg, m, v)) as loggers:
        res = recipe(run_cfg, m, v, splits["train"], splits["val"], where=f"models[{i}]", callbacks=callbacks,
                     extra_metrics={"skipped_bad_samples": bad} if bad else None, run_loggers=loggers)
        summary.update(status="complete", reused=False, metrics=res["metrics"])
        if wants_eval:
            model, encoder = res["model"], res["encoder"]
            if model is None and dist.is_main():  # a staged run whose stages had all finished before
                from ..eval.standalone import load_run

                em = load_run(rd.path)
                model, encoder = em.model, em.encoder
            summary["generation_metrics"] = _evaluate(run_cfg, model, encoder, samples, rd)
            summary["eval_split"] = split
        log_run_values(loggers, res["metrics"], summary.get("generation_metrics"))
    return summary


def generation_values(gm: dict[str, Any]) -> dict[str, float]:
    """generation_metrics.json as logger values: `generation/<metric>` (its value; a metric of
    several values, e.g. token_stats, as `generation/<metric>/<name>`), and the counts and
    seconds beside them. Settings (generation, prompt, bootstrap) are not values."""
    out: dict[str, float] = {}
    for k, e in gm.items():
        if isinstance(e, dict):
            if isinstance(e.get("value"), dict):
                out.update(numeric_leaves(e["value"], f"generation/{k}"))
            elif "value" in e:
                out.update(numeric_leaves({k: e["value"]}, "generation"))
        else:
            out.update(numeric_leaves({k: e}, "generation"))
    return out


def log_run_values(loggers: RunLoggers, metrics: dict[str, Any], gm: Optional[dict[str, Any]]) -> None:
    """A run's final values to its loggers: metrics.json's numbers as `run/<key>` (lists, the
    loss curves, are already there step by step) and its generation metrics, at the last step."""
    values = {**numeric_leaves(metrics, "run"), **generation_values(gm or {})}
    loggers.log_values(values, step=int(metrics.get("global_step") or 0))


def prepare_grid(cfg: Config, runs: list[tuple[int, ModelConfig, LoraConfig]]) -> tuple[dict[str, Optional[list[Sample]]], dict[str, int]]:
    """What every launcher checks before anything loads or is written: each run's precisions,
    the metric names, and the data gate (every row and image header). Returns the splits and
    the bad-sample counts per split (data.on_bad_sample: skip)."""
    for i, m, v in runs:  # refuse impossible precisions before anything loads or is written
        preflight(cfg.for_variant(v), m, v, f"models[{i}]")
    if cfg.evaluation.metrics:
        from ..eval.metrics import check_names

        check_names(cfg.evaluation.metrics, "evaluation.metrics")
    # The data gate: every row and image header checked before any model loads.
    splits, report = gate(cfg)
    return splits, {k: c["bad"] for k, c in report.counts.items() if c["bad"]}


def run_grid(cfg: Config, model: Optional[str] = None, variant: Optional[str] = None, only: Optional[str] = None,
             keep_going: bool = False, reuse: bool = False) -> list[dict[str, Any]]:
    """Train (and evaluate) the selected runs; one summary per run with its `status`
    (`complete` or, with `keep_going`, `failed` and the `error`).

    `reuse` (vlmtune run): finished runs are reused as they are. Without it (vlmtune train)
    every run trains -- continuing from its checkpoints, e.g. to more steps."""
    runs = select_runs(cfg, model, variant, only)
    splits, bad = prepare_grid(cfg, runs)
    from .progress import GridProgress

    results = []
    progress = GridProgress(len(runs))
    try:
        for k, (i, m, v) in enumerate(runs, start=1):
            _run_one_recorded(cfg, k, len(runs), i, m, v, splits, bad, keep_going, progress, results, reuse)
    finally:
        progress.close()
    return results


def _run_one_recorded(cfg: Config, k: int, n: int, i: int, m: ModelConfig, v: LoraConfig, splits: dict[str, Optional[list[Sample]]],
                      bad: dict[str, int], keep_going: bool, progress: Any, results: list[dict[str, Any]], reuse: bool) -> None:
    name = run_name(m, v)
    log.info("[run %d/%d] %s", k, n, name)
    progress.start_run(k, name)
    try:
        try:
            results.append(_one_run(cfg, i, m, v, splits, bad, [progress.callback()] if progress.enabled else None, reuse))
        except (UserError, RuntimeError, ValueError, OSError, MemoryError) as e:
            if not keep_going:
                raise
            msg = error_line(e)
            log.error("%s failed: %s", name, msg)
            log.debug("%s", traceback.format_exc())
            results.append({"run": name, "run_dir": str(cfg.resolved_output_dir() / name), "model": m.name, "variant": v.name,
                            "status": "failed", "error": msg})
    finally:
        progress.end_run()


def error_line(e: BaseException) -> str:
    """A failed run's error as its summary entry records it: one line."""
    return e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def whole_grid(cfg: Config, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of the config in grid order: `done` (after `--only`), the others as they are
    on disk (finished: reused; otherwise `pending`) -- so the summary always covers the grid."""
    by_name = {r["run"]: r for r in done}
    out = []
    for _, m, v in select_runs(cfg):
        name = run_name(m, v)
        if name in by_name:
            out.append(by_name[name])
            continue
        rd = RunDir(cfg.resolved_output_dir() / name)
        entry: dict[str, Any] = {"run": name, "run_dir": str(rd), "model": m.name, "variant": v.name}
        if rd.is_trained() and not _settings_differ(rd, cfg.for_variant(v), m, v):
            entry.update(status="complete", reused=True)
        else:
            entry.update(status="pending", error="not run yet (vlmtune run without --only runs it)")
        out.append(entry)
    return out


def describe_runs(cfg: Config, only: Optional[str] = None) -> list[str]:
    """One line per selected run: what it trains (`vlmtune run --dry-run`)."""
    from ..train.plan import describe_plan, plan_parts

    lines = []
    for _, m, v in select_runs(cfg, only=only):
        rc = cfg.for_variant(v)
        plan = describe_stages(rc) if rc.training.stages else describe_plan(plan_parts(rc.training, rc.visual_encoder_settings))
        lora = f"r={v.r} alpha={v.alpha:g} dropout={v.dropout:g}"
        lines.append(f"{run_name(m, v)}: {m.hf_model_id}; mode {rc.training.training_mode}: {plan}; LoRA {lora}; lr {rc.training.learning_rate:g}")
    return lines

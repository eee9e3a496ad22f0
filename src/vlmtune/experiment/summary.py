"""`ablation_summary.json`: every run of a grid side by side, the best run per metric, and a
paired bootstrap test of each run against its baseline.

Paired test: both runs' predictions on the *same* samples (matched by id) are resampled with
the *same* indices (one seed, see eval/bootstrap.py), each resample scored with the metric's
own corpus formula, and the differences (run - baseline) give the 95% interval. The p-value
is two-sided: twice the share of resampled differences on the other side of zero from the
observed one (Koehn 2004's paired bootstrap), capped at 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..eval import metrics as M
from ..eval.bootstrap import Bootstrap
from ..io import read_json
from ..train.rundir import RunDir

log = logging.getLogger("vlmtune")

LOWER_IS_BETTER = {"cer", "wer"}
NOT_COMPARED = {"token_stats", "coco"}  # descriptive, or several values in one


class _Recording(Bootstrap):
    """A Bootstrap that keeps every resampled score array it computes, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.arrays: list[np.ndarray] = []

    def resampled(self, stats, aggregate):  # type: ignore[override]
        out = super().resampled(stats, aggregate)
        self.arrays.append(out)
        return out


def _resampled_scores(metric: str, records: list[dict[str, Any]]) -> tuple[Optional[float], Optional[np.ndarray]]:
    rec = _Recording()
    e = M.compute([metric], [r["prediction"] for r in records], [r["references"] for r in records], bootstrap=rec)[metric]
    if e.get("value") is None or not rec.arrays:
        return None, None
    return float(e["value"]), rec.arrays[0]


def paired_bootstrap(metric: str, run: list[dict[str, Any]], base: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Difference run - baseline on the samples both predicted, with interval and p-value."""
    by_id = {r["id"]: r for r in run}
    common = [b["id"] for b in base if b["id"] in by_id]
    if not common:
        return None
    base_by_id = {b["id"]: b for b in base}
    a_val, a = _resampled_scores(metric, [by_id[i] for i in common])
    b_val, b = _resampled_scores(metric, [base_by_id[i] for i in common])
    if a is None or b is None:
        return None
    diff = a - b
    observed = a_val - b_val
    lo, hi = np.percentile(diff, [2.5, 97.5])
    if observed > 0:
        p = 2 * float(np.mean(diff <= 0))
    elif observed < 0:
        p = 2 * float(np.mean(diff >= 0))
    else:
        p = 1.0
    return {"difference": observed, "ci95": [float(lo), float(hi)], "p_value": min(1.0, p), "n": len(common)}


def _read(path: Path) -> Optional[Any]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _predictions(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "predictions.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_entry(cfg: Config, result: dict[str, Any]) -> dict[str, Any]:
    """One run's row of the summary, from its result and the files in its run directory."""
    run_dir = Path(result["run_dir"])
    model = next(m for m in cfg.models if m.name == result["model"])
    variant = next(v for v in cfg.variants() if v.name == result["variant"])
    entry: dict[str, Any] = {
        "run": result["run"], "model": {"name": model.name, "hf_model_id": model.hf_model_id}, "variant": variant.name,
        "status": result["status"], "run_dir": str(run_dir),
    }
    if result["status"] != "complete":
        entry["error"] = result.get("error")
        if result.get("attempts"):  # --launcher ray: how many times the run was tried
            entry["attempts"] = result["attempts"]
        return entry
    import dataclasses

    run_cfg = cfg.for_variant(variant)
    entry["settings"] = {"lora": {k: v for k, v in dataclasses.asdict(variant).items() if k != "training"},
                         "training": dataclasses.asdict(run_cfg.training)}
    entry["reused"] = bool(result.get("reused"))
    rep = _read(RunDir(run_dir).parameter_report) or {}
    entry["parameters"] = {"total": rep.get("total_parameters"), "trainable": rep.get("trainable_parameters"), "by_part": rep.get("parts")}
    m = result.get("metrics") or _read(RunDir(run_dir).metrics) or {}
    secs = m.get("train_seconds")
    entry.update({
        "train_seconds": secs,
        "tokens_seen": m.get("tokens_seen"),
        "tokens_per_second": (m["tokens_seen"] / secs) if m.get("tokens_seen") and secs else None,
        "peak_memory": m.get("peak_memory"),
        "final_train_loss": m.get("final_train_loss"),
        "final_eval_loss": m.get("final_eval_loss"),
        "global_step": m.get("global_step"),
    })
    gm = result.get("generation_metrics") or _read(RunDir(run_dir).generation_metrics) or {}
    entry["metrics"] = {k: {"value": e["value"], "ci95": e.get("ci95")} for k, e in gm.items() if isinstance(e, dict) and "value" in e}
    entry["n_eval_samples"] = gm.get("n_samples")
    return entry


def _baseline_for(cfg: Config, entries: list[dict[str, Any]], model: str) -> Optional[str]:
    runs = [e["run"] for e in entries]
    if cfg.baseline:
        if cfg.baseline in runs:
            return cfg.baseline
        cand = f"{model}__{cfg.baseline}"
        return cand if cand in runs else None
    first = next((e["run"] for e in entries if e["model"]["name"] == model), None)
    return first


def build_summary(cfg: Config, results: list[dict[str, Any]]) -> dict[str, Any]:
    entries = [run_entry(cfg, r) for r in results]
    done = [e for e in entries if e["status"] == "complete"]
    metric_names = sorted({k for e in done for k, v in e.get("metrics", {}).items() if k not in NOT_COMPARED and isinstance(v.get("value"), (int, float))})
    best: dict[str, Any] = {}
    for name in metric_names:
        scored = [(e["metrics"][name]["value"], e["run"]) for e in done if isinstance(e.get("metrics", {}).get(name, {}).get("value"), (int, float))]
        if scored:
            lower = name in LOWER_IS_BETTER
            value, run = (min if lower else max)(scored)
            best[name] = {"run": run, "value": value, "higher_is_better": not lower}
    paired = []
    preds = {e["run"]: _predictions(Path(e["run_dir"])) for e in done}
    for e in done:
        base = _baseline_for(cfg, entries, e["model"]["name"])
        e["baseline"] = base
        if base is None or base == e["run"] or base not in preds or not preds[base] or not preds[e["run"]]:
            continue
        for name in metric_names:
            if name not in e.get("metrics", {}):
                continue
            test = paired_bootstrap(name, preds[e["run"]], preds[base])
            if test:
                paired.append({"metric": name, "run": e["run"], "baseline": base, **test})
    return {
        "experiment_name": cfg.experiment_name,
        "output_dir": str(cfg.resolved_output_dir()),
        "n_runs": len(entries),
        "n_failed": sum(e["status"] == "failed" for e in entries),
        "n_pending": sum(e["status"] == "pending" for e in entries),
        "runs": entries,
        "best": best,
        "paired_tests": paired,
        "bootstrap": Bootstrap().describe(),
    }


def summary_values(summary: dict[str, Any]) -> dict[str, float]:
    """ablation_summary.json as logger values: per complete run `<run>/<final loss, time,
    tokens/s, step>` and `<run>/<metric>`, per paired test `<run>/<metric>/difference` and
    `/p_value` (against the run's baseline), and `best/<metric>`."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out[key] = float(v)

    for e in summary["runs"]:
        if e["status"] != "complete":
            continue
        for k in ("final_train_loss", "final_eval_loss", "train_seconds", "tokens_per_second", "global_step"):
            put(f"{e['run']}/{k}", e.get(k))
        for name, m in (e.get("metrics") or {}).items():
            put(f"{e['run']}/{name}", m.get("value"))
    for t in summary["paired_tests"]:
        put(f"{t['run']}/{t['metric']}/difference", t["difference"])
        put(f"{t['run']}/{t['metric']}/p_value", t["p_value"])
    for name, b in summary["best"].items():
        put(f"best/{name}", b["value"])
    return out


def log_summary(cfg: Config, summary: dict[str, Any]) -> None:
    """The grid summary to `training.report_to`'s loggers, as a logged run of its own named
    `<experiment>/ablation_summary` (tensorboard and wandb under `<output_dir>/logs/`, mlflow
    in the experiment's store): `summary_values` at step 0, and the whole summary as
    ablation_summary.json (tensorboard text, mlflow artifact)."""
    from ..train.loggers import LoggedRun, check_installed
    from ..train.rundir import grid_logs

    names = check_installed(cfg.training.report_to)  # checked before the runs too (their preflight)
    if not names:
        return
    with LoggedRun(cfg, names, f"{cfg.experiment_name}/ablation_summary", grid_logs(cfg.resolved_output_dir()), cfg.to_dict()) as lr:
        lr.log_values(summary_values(summary), step=0, documents={"ablation_summary.json": summary})

"""Run every model x LoRA variant of a config: train, then (if enabled) evaluate.

Runs are named `<model>__<variant>` and live under `output_dir` (seed 003's tree).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..config import Config, LoraConfig, ModelConfig
from ..data.check import gate
from ..data.sources import Sample
from ..errors import UserError
from ..io import atomic_write_json
from ..eval.generate import GenerationSettings, describe_weights, evaluate_samples
from ..train.sft import check_precision, run_name, train_run

log = logging.getLogger("vlmtune")


def select_runs(cfg: Config, model: Optional[str] = None, variant: Optional[str] = None) -> list[tuple[int, ModelConfig, LoraConfig]]:
    models = [(i, m) for i, m in enumerate(cfg.models) if model is None or m.name == model]
    if model is not None and not models:
        raise UserError("--model", f"no model named {model!r} in the config", f"choose one of {', '.join(m.name for m in cfg.models)}")
    variants = [v for v in cfg.variants() if variant is None or v.name == variant]
    if variant is not None and not variants:
        raise UserError("--variant", f"no variant named {variant!r} in the config", f"choose one of {', '.join(v.name for v in cfg.variants())}")
    return [(i, m, v) for i, m in models for v in variants]


def eval_split(cfg: Config, splits: dict[str, Optional[list[Sample]]]) -> tuple[Optional[str], Optional[list[Sample]]]:
    order = ["test", "val"] if cfg.evaluation.split == "test" else ["val", "test"]
    for s in order:
        if splits.get(s):
            samples = splits[s]
            if cfg.evaluation.max_samples:
                samples = samples[: cfg.evaluation.max_samples]
            return s, samples
    return None, None


def run_grid(cfg: Config, model: Optional[str] = None, variant: Optional[str] = None) -> list[dict[str, Any]]:
    """Train (and evaluate) the selected runs; returns one summary per run."""
    runs = select_runs(cfg, model, variant)
    for i, m, _ in runs:  # refuse impossible precisions before anything loads or is written
        check_precision(cfg, m, f"models[{i}]")
    if cfg.evaluation.metrics:
        from ..eval.metrics import check_names

        check_names(cfg.evaluation.metrics, "evaluation.metrics")
    # The data gate: every row and image header checked before any model loads.
    splits, report = gate(cfg)
    bad = {k: v["bad"] for k, v in report.counts.items() if v["bad"]}
    results = []
    for k, (i, m, v) in enumerate(runs, start=1):
        log.info("[%d/%d] %s", k, len(runs), run_name(m, v))
        res = train_run(cfg, m, v, splits["train"], splits["val"], where=f"models[{i}]")
        if bad:  # data.on_bad_sample: skip -- the run says how much data it did not see
            res["metrics"]["skipped_bad_samples"] = bad
            atomic_write_json(Path(res["run_dir"]) / "metrics.json", res["metrics"])
        summary = {"run": res["run"], "run_dir": res["run_dir"], "metrics": res["metrics"]}
        split, samples = eval_split(cfg, splits)
        if cfg.evaluation.enabled and samples:
            bs = cfg.evaluation.batch_size or cfg.training.per_device_eval_batch_size
            run_dir = Path(res["run_dir"])
            summary["generation_metrics"] = evaluate_samples(
                res["model"], res["encoder"], samples, run_dir, bs,
                GenerationSettings.from_training(cfg.training), cfg.evaluation.metrics,
                model_desc=describe_weights(run_dir / "final"),
            )
            summary["eval_split"] = split
        results.append(summary)
    return results

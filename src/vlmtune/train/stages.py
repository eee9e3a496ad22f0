"""Staged training (seed 002): e.g. 1. projector only, 2. projector + LLM with LoRA, 3. all
parts at a low learning rate -- one command, resumable stage by stage.

    <run>/stage_1_<name>/   a complete run tree (checkpoints/, final/, metrics.json, ...)
    <run>/stage_2_<name>/   starts from stage 1's final/ (adapters merged in)
    ...
    <run>/final/, lora_adapter/, metrics.json   the last stage's, for evaluation and the grid

Each stage is an ordinary single-stage run (`sft.train_run`) of the config with the stage's
overrides, whose model is the previous stage's merged `final/`: an adapter is always merged
before the next stage starts, so each stage's LoRA starts fresh on the weights the previous
stage left. A rerun skips finished stages (their `metrics.json`) and resumes an
interrupted one from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import Any, Optional

from ..io import read_json
from ..config import Config, LoraConfig, ModelConfig, StageConfig, deep_merge, from_dict
from ..data.sources import Sample
from .loggers import RunLoggers
from .rundir import RunDir, resolved_run_config, run_name
from .plan import describe_plan, plan_parts
from .sft import preflight as sft_preflight
from .sft import train_run

log = logging.getLogger("vlmtune")

_TRAINING_KEYS = ("training_mode", "parts", "learning_rate", "max_steps", "num_train_epochs")


def stage_config(cfg: Config, stage: StageConfig, index: int) -> Config:
    """`cfg` with the stage's training overrides, as a single-stage config."""
    over: dict[str, Any] = {}
    for k in _TRAINING_KEYS:
        v = getattr(stage, k)
        if v is not None:
            over[k] = {p: dataclasses.asdict(pc) for p, pc in v.items()} if k == "parts" else v
    if stage.max_steps is None and stage.num_train_epochs is not None:
        over["max_steps"] = -1  # epochs asked for: the run-wide max_steps must not win
    training = dataclasses.asdict(cfg.training)
    training["stages"] = None
    t = from_dict(type(cfg.training), deep_merge(training, over), f"training.stages[{index - 1}]", "config")
    return dataclasses.replace(cfg, training=t)


def stage_variant(variant: LoraConfig, stage: StageConfig, index: int) -> LoraConfig:
    """The variant with the stage's LoRA settings on top."""
    merged = {**dataclasses.asdict(variant), **(stage.lora or {}), "training": None}
    return from_dict(LoraConfig, merged, f"training.stages[{index - 1}].lora", "config")


def preflight(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, where: str) -> None:
    """`sft.preflight`, and every stage's config, LoRA settings and plan resolved, so that a
    mistake in stage 3 stops the run before stage 1 trains."""
    sft_preflight(cfg, mcfg, where)
    for i, stage in enumerate(cfg.training.stages or [], start=1):
        scfg = stage_config(cfg, stage, i)
        stage_variant(variant, stage, i)
        plan_parts(scfg.training, scfg.visual_encoder_settings)


def describe_stages(cfg: Config) -> str:
    """One line: what each stage trains (`vlmtune run --dry-run`)."""
    return "; ".join(f"stage {i} {s.name}: {describe_plan(plan_parts((sc := stage_config(cfg, s, i)).training, sc.visual_encoder_settings))}"
                     for i, s in enumerate(cfg.training.stages or [], start=1))


def train_staged(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, train_samples: list[Sample], val_samples: Optional[list[Sample]],
                 where: str = "model", callbacks: Optional[list[Any]] = None, extra_metrics: Optional[dict[str, Any]] = None,
                 run_loggers: Optional[RunLoggers] = None) -> dict[str, Any]:
    """Train every stage of `cfg.training.stages` in order, then give the run's top level the
    last stage's outputs. Same arguments and result as `sft.train_run`; with `run_loggers`
    every stage logs into that one run (each stage nested under it in mlflow)."""
    if not cfg.training.stages:
        return train_run(cfg, mcfg, variant, train_samples, val_samples, where, callbacks, extra_metrics, run_loggers=run_loggers)
    name = run_name(mcfg, variant)
    rd = RunDir(cfg.resolved_output_dir() / name)
    source = mcfg
    per_stage: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    n = len(cfg.training.stages)
    for i, stage in enumerate(cfg.training.stages, start=1):
        scfg = stage_config(cfg, stage, i)
        svariant = stage_variant(variant, stage, i)
        srd = rd.stage(i, stage.name)
        if srd.is_trained() and srd.has_model():
            log.info("run %s: stage %d/%d %s finished earlier, reused", name, i, n, stage.name)
            metrics = srd.read_metrics()
            result = {"run": name, "model": None, "metrics": metrics, "stage_dir": srd.path}
        else:
            log.info("run %s: stage %d/%d %s", name, i, n, stage.name)
            result = train_run(scfg, source, svariant, train_samples, val_samples, where, callbacks, extra_metrics, run_dir=srd,
                               run_loggers=run_loggers)
            metrics = result["metrics"]
        per_stage.append({"stage": i, "name": stage.name, "run_dir": str(srd), "final_train_loss": metrics.get("final_train_loss"),
                          "global_step": metrics.get("global_step"), "train_seconds": metrics.get("train_seconds")})
        # the next stage starts from this stage's merged weights
        source = dataclasses.replace(mcfg, hf_model_id=str(srd.final.resolve()))

    last = rd.stage(n, cfg.training.stages[-1].name)
    _publish_last_stage(rd, last, cfg, mcfg, variant)
    metrics = {**last.read_metrics(), "stages": per_stage, "train_seconds": sum(s["train_seconds"] or 0 for s in per_stage)}
    rd.write_json(rd.metrics, metrics)  # last: the staged run is complete
    # "model" is None when the last stage had finished before this call: callers load final/
    return {"run": name, "run_dir": str(rd), "model": result.get("model"), "loaded": result.get("loaded"),
            "encoder": result.get("encoder"), "metrics": metrics}


def _publish_last_stage(rd: RunDir, last: RunDir, cfg: Config, mcfg: ModelConfig, variant: LoraConfig) -> None:
    """Copy the last stage's `final/` and `lora_adapter/` (and its parameter report) to the
    run's top level, each swapped in atomically; the run's config.yaml is the staged config."""
    rd.prepare()
    rd.write_yaml(rd.config, resolved_run_config(cfg, mcfg, variant))
    for src, dst in ((last.final, rd.final), (last.lora_adapter, rd.lora_adapter)):
        if src.is_dir():
            rd.save_dir(dst, lambda tmp, src=src: shutil.copytree(src, tmp))
    if last.parameter_report.is_file():
        rd.write_json(rd.parameter_report, read_json(last.parameter_report))

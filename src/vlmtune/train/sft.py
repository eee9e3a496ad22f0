"""Supervised fine-tuning of one run (`<model>__<variant>`), top to bottom:

    1. load the model and apply what trains (plan -> LoRA / full / frozen, dtypes)
    2. encode the data (assistant-only labels)
    3. open the run directory (only now: every user error above leaves nothing behind)
    4. train with `VlmTrainer` (part-wise LR groups, non-finite guard), resuming from the
       newest complete checkpoint
    5. save `lora_adapter/`, `final/`, then `metrics.json` last

Under torchrun / accelerate launch every rank runs this same recipe; the Trainer shards the
data and synchronises gradients, and `RunDir` lets only rank 0 write.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import torch

from .. import dist
from ..config import Config, LoraConfig, ModelConfig
from ..data.collate import Encoder, SFTDataset
from ..data.sources import Sample
from ..errors import UserError
from ..models.loading import LoadedModel, load_model, pick_dtype, quantization_bits
from .adapt import apply_plan
from .args import check_deepspeed, training_arguments
from .fsdp import check_fsdp, shard_model
from . import loggers
from .outputs import run_metrics, save_outputs
from .plan import Plan, describe_plan, format_report, parameter_report, plan_parts
from .precision import cast_trainables, check_precision, check_resume_dtype, trainable_dtype
from .rundir import RunDir, check_writable, resolved_run_config, run_name
from .packing import training_data
from .trainer import VlmTrainer

log = logging.getLogger("vlmtune")

__all__ = ["train_run", "prepare_model", "preflight", "fit", "finish", "check_precision", "run_name", "resolved_run_config", "save_outputs"]


def preflight(cfg: Config, mcfg: ModelConfig, where: str) -> None:
    """Refuse, before anything loads, what cannot run here: precisions, FSDP in one process,
    DeepSpeed without a GPU, an output folder that cannot be written, a `report_to` logger
    that is not installed."""
    check_precision(cfg, mcfg, where)
    check_fsdp(cfg.training.fsdp, cfg.training.fsdp_config, quantized=bool(mcfg.load_in_4bit or mcfg.load_in_8bit))
    if cfg.training.deepspeed:
        check_deepspeed(cfg.training.deepspeed)
    check_writable(cfg.resolved_output_dir())
    loggers.preflight(cfg)


def prepare_model(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, where: str) -> tuple[LoadedModel, torch.nn.Module, Plan]:
    """Load the base model and apply what trains; returns (loaded, model to train, plan).

    Trained tensors end in one dtype (see `precision.trainable_dtype`).
    """
    plan = plan_parts(cfg.training, cfg.visual_encoder_settings)
    bits = quantization_bits(mcfg, where)
    if bits and plan["llm"].train != "full" and not any(pp.train == "lora" for pp in plan.values()):
        raise UserError(f"{where}.load_in_{bits}bit", f"no part trains with LoRA ({describe_plan(plan)}), and a {bits}-bit model trains only through LoRA adapters",
                        f"train the llm with lora (training_mode: llm or both), or set load_in_{bits}bit: false")
    # QLoRA: only the LLM's linear layers are quantized; what trains fully stays full precision
    lm = load_model(mcfg, cfg.visual_encoder_settings, where, full_precision_parts=[p for p, pp in plan.items() if pp.train == "full"],
                    packing=cfg.training.packing)
    model = apply_plan(lm.model, lm.parts, lm.family, plan, variant)
    cast_trainables(model, trainable_dtype(pick_dtype(mcfg.torch_dtype), cfg.training.mixed_precision))
    return lm, model, plan


def fit(trainer: Any, rd: RunDir, cfg: Config, model: torch.nn.Module, name: str, where: str) -> tuple[Optional[str], float]:
    """Train, resuming from the run's newest complete checkpoint (`training.resume: auto`),
    refusing one of another dtype; a full disk is one line. Returns (checkpoint resumed from,
    seconds trained)."""
    if cfg.training.resume_from:
        resume = _given_checkpoint(cfg.training.resume_from)
    else:
        resume = rd.resume_checkpoint() if cfg.training.resume == "auto" else None
    check_resume_dtype(resume, model, where)
    if resume and dist.is_main():
        log.info("run %s: resuming from %s", name, resume)
    t0 = time.time()
    with rd.disk_errors(f"run {name}", "a checkpoint"):
        trainer.train(resume_from_checkpoint=resume)
    return resume, time.time() - t0


def _given_checkpoint(path: str) -> str:
    """`training.resume_from` checked: a complete checkpoint folder, or one line."""
    from pathlib import Path

    from .checkpoints import checkpoint_problem

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError("--resume-from", f"{path!r} is not a folder", "pass a checkpoint folder, e.g. results/exp/run/checkpoints/checkpoint-500")
    if (why := checkpoint_problem(p)) is not None:
        raise UserError("--resume-from", f"{path} is not a complete checkpoint ({why})", "pass another checkpoint-N folder, or drop --resume-from to use the run's newest complete one")
    return str(p.resolve())


def finish(model: torch.nn.Module, lm: LoadedModel, rd: RunDir, metrics: dict[str, Any], name: str,
           rebuild: Callable[[], torch.nn.Module]) -> Optional[torch.nn.Module]:
    """Write lora_adapter/ and final/, then metrics.json last (its presence says the outputs
    beside it are complete); a full disk is one line. Returns the merged model (rank 0)."""
    with rd.disk_errors(f"run {name}", "lora_adapter/, final/ and metrics.json"):
        merged = save_outputs(model, lm, rd, rebuild=rebuild)
        rd.write_json(rd.metrics, metrics)
    return merged


def train_run(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, train_samples: list[Sample], val_samples: Optional[list[Sample]],
              where: str = "model", callbacks: Optional[list[Any]] = None, extra_metrics: Optional[dict[str, Any]] = None,
              run_dir: Optional[RunDir] = None, run_loggers: Optional[loggers.RunLoggers] = None) -> dict[str, Any]:
    """Train one `<model>__<variant>` run (in `run_dir`, default `<output_dir>/<model>__<variant>`);
    returns a summary (paths, losses, timings) and, on rank 0, the merged model and encoder
    for evaluation. `run_loggers`: the `report_to` loggers to log into (the grid's, open from
    training to evaluation); None opens loggers for this training only.

    Crash safety: with `training.resume: auto` a rerun of the same command continues from the
    newest *complete* checkpoint (a checkpoint half-written by a kill is moved aside) and
    ends where an uninterrupted run ends: weights, optimizer, scheduler and RNG states come
    from the checkpoint (Trainer), the data order is a pure function of the seed and the
    epoch (accelerate's seedable sampler), the already-trained batches of the epoch are
    skipped (Trainer), and what happens before the Trainer (LoRA/new-weight init) is seeded
    here. Every output is written atomically.
    """
    from transformers import set_seed

    dist.init()
    name = run_name(mcfg, variant)
    rd = run_dir or RunDir(cfg.resolved_output_dir() / name)
    preflight(cfg, mcfg, where)

    # 1. Model and what trains. The Trainer seeds only once it is built, after LoRA adapters
    # and any newly initialised weights got their random init: seed before, so
    # `training.seed` fixes those too and a fresh rerun starts from the same weights.
    set_seed(cfg.training.seed)
    lm, model, plan = prepare_model(cfg, mcfg, variant, where)
    report = parameter_report(model, lm.parts)
    report.update({"model": mcfg.hf_model_id, "family": lm.family_name, "plan": {p: dataclasses.asdict(v) for p, v in plan.items()},
                   "newly_initialized": lm.newly_initialized})
    if dist.is_main():
        log.info("run %s: %s\n%s", name, describe_plan(plan), format_report(report))
    if cfg.training.fsdp:
        shard_model(model, cfg.training.fsdp, cfg.training.fsdp_config)

    # 2. Data.
    encoder = Encoder(lm.processor, lm.family)
    train_ds = SFTDataset(train_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "train")
    want_eval = cfg.training.eval_strategy != "no"
    if want_eval and not val_samples:
        raise UserError("training.eval_strategy", f"{cfg.training.eval_strategy!r} needs validation data", "set data.val_file (or val_csv / val_jsonl), or eval_strategy: no")
    val_ds = SFTDataset(val_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "val") if want_eval else None
    # training.packing: bins of samples in padding-free rows (train/packing.py), or padded
    train_set, collator, sample_ids, packed = training_data(cfg, lm, train_ds, f"run {name}")

    # 3. The run directory appears only now, with the model loaded, the plan applied and the
    # data encoded (each a place where a user error can still surface).
    rd.prepare()
    rd.write_yaml(rd.config, resolved_run_config(cfg, mcfg, variant))
    rd.write_json(rd.parameter_report, report)

    # 4. Train.
    args = training_arguments(cfg, rd.checkpoints, name, val_ds is not None)
    trainer = VlmTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_ds,
        data_collator=collator,
        part_map=lm.parts, part_plan=plan,
        nan_policy=cfg.training.nan_policy, sample_ids=sample_ids, run_label=f"run {name}",
        image_token_id=encoder.image_token_id,
        lean_loss=cfg.training.lean_loss, loss_chunk_size=cfg.training.loss_chunk_size,
        sample_lengths=train_ds.lengths if cfg.training.group_by_length and packed is None else None,
    )
    for cb in callbacks or []:
        trainer.add_callback(cb)
    with loggers.logging_to(trainer, cfg, rd, name, resolved_run_config(cfg, mcfg, variant), run_loggers):  # report_to: where, what
        resume, train_seconds = fit(trainer, rd, cfg, model, name, where)

    # 5. Outputs; metrics.json last: its presence says the outputs beside it are complete.
    metrics = run_metrics(trainer, resume, train_seconds, n_train_samples=len(train_ds), skipped_overlength=len(train_ds.skipped),
                          packed_rows=len(packed) if packed is not None else None,
                          **(extra_metrics or {}))
    merged = finish(model, lm, rd, metrics, name, rebuild=lambda: prepare_model(cfg, mcfg, variant, where)[1])
    return {"run": name, "run_dir": str(rd), "model": merged, "loaded": lm, "encoder": encoder, "metrics": metrics}

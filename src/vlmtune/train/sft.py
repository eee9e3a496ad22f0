"""Supervised fine-tuning of one run (`<model>__<variant>`), top to bottom:

config -> load model -> plan what trains -> data -> transformers Trainer -> save
(`checkpoints/`, `lora_adapter/`, `final/`, `metrics.json`, `config.yaml`,
`parameter_report.json`) -> optional evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, LoraConfig, ModelConfig
from ..data.collate import Collator, Encoder, SFTDataset
from ..data.sources import Sample, load_split
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_yaml
from ..models.loading import LoadedModel, load_model
from .components import apply_plan, describe_plan, format_report, param_groups, parameter_report, plan_parts

log = logging.getLogger("vlmtune")


def run_name(model: ModelConfig, variant: LoraConfig) -> str:
    return f"{model.name}__{variant.name}"


def check_precision(cfg: Config, mcfg: ModelConfig, where: str) -> None:
    """Refuse precisions this machine cannot run, before any weights load."""
    cuda = torch.cuda.is_available()
    mp = cfg.training.mixed_precision
    if mp == "fp16" and not cuda:
        raise UserError("training.mixed_precision", "fp16 needs a CUDA GPU and none is available", "use mixed_precision: bf16 or no on CPU")
    if mp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("training.mixed_precision", "bf16 is not supported by this GPU", "use mixed_precision: fp16")
    if mcfg.torch_dtype == "float16" and not cuda:
        raise UserError(f"{where}.torch_dtype", "float16 weights cannot be trained on CPU", "use torch_dtype: float32 or bfloat16 (or auto)")
    if mcfg.torch_dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where}.torch_dtype", "bfloat16 is not supported by this GPU", "use torch_dtype: float16 or float32")


def training_arguments(cfg: Config, run_dir: Path, name: str, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.training
    eval_strategy = t.eval_strategy if has_eval else "no"
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=t.optim,
        logging_steps=t.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end and eval_strategy != "no",
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        bf16_full_eval=t.bf16_full_eval,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs=t.gradient_checkpointing_kwargs or {"use_reentrant": False},
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers if t.dataloader_num_workers is not None else cfg.data.num_workers,
        report_to=t.report_to,
        run_name=t.run_name or f"{cfg.experiment_name}/{name}",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=os.environ.get("VLMTUNE_NO_PROGRESS") == "1",
    )
    if t.fsdp:
        kwargs["fsdp"] = t.fsdp
        kwargs["fsdp_config"] = t.fsdp_config
    if t.ddp_find_unused_parameters is not None:
        kwargs["ddp_find_unused_parameters"] = t.ddp_find_unused_parameters
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, ImportError) as e:
        raise UserError("training", str(e).splitlines()[0], "fix the training settings named above") from None


def _make_trainer_cls():
    from transformers import Trainer

    class VlmTrainer(Trainer):
        """transformers' Trainer with one optimizer group per part (LR multipliers)."""

        def __init__(self, *args, vlm_groups=None, **kwargs):
            self._vlm_groups = vlm_groups
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is None and self._vlm_groups is not None:
                optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optim_cls(self._vlm_groups, **optim_kwargs)
                return self.optimizer
            return super().create_optimizer(model)

    return VlmTrainer


def _save_dir_atomically(path: Path, save) -> None:
    """Call `save(tmp)` then swap `tmp` into `path`: no half-written output directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _loss_history(log_history: list[dict]) -> dict[str, Any]:
    train = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"), "epoch": h.get("epoch")} for h in log_history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"], "epoch": h.get("epoch")} for h in log_history if "eval_loss" in h]
    summary = next((h for h in reversed(log_history) if "train_runtime" in h), {})
    return {"train_loss_history": train, "eval_loss_history": evals, "train_summary": summary}


def prepare_model(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, where: str) -> tuple[LoadedModel, torch.nn.Module, dict]:
    """Load the base model and apply what trains; returns (loaded, model to train, plan)."""
    lm = load_model(mcfg, cfg.visual_encoder_settings, where)
    plan = plan_parts(cfg.training, cfg.visual_encoder_settings)
    model = apply_plan(lm.model, lm.parts, lm.family, plan, variant)
    return lm, model, plan


def train_run(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, train_samples: list[Sample], val_samples: Optional[list[Sample]],
              where: str = "model") -> dict[str, Any]:
    """Train one `<model>__<variant>` run; returns a summary (paths, losses, timings)."""
    from transformers.trainer_utils import get_last_checkpoint

    name = run_name(mcfg, variant)
    run_dir = cfg.resolved_output_dir() / name
    check_precision(cfg, mcfg, where)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["models"] = [dataclasses.asdict(mcfg)]
    resolved["lora_variants"] = [dataclasses.asdict(variant)]
    atomic_write_yaml(run_dir / "config.yaml", resolved)

    lm, model, plan = prepare_model(cfg, mcfg, variant, where)
    report = parameter_report(model, lm.parts)
    report.update({"model": mcfg.hf_model_id, "family": lm.family_name, "plan": {p: dataclasses.asdict(v) for p, v in plan.items()},
                   "newly_initialized": lm.newly_initialized})
    log.info("run %s: %s\n%s", name, describe_plan(plan), format_report(report))
    atomic_write_json(run_dir / "parameter_report.json", report)

    encoder = Encoder(lm.processor, lm.family)
    train_ds = SFTDataset(train_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "train")
    want_eval = cfg.training.eval_strategy != "no"
    if want_eval and not val_samples:
        raise UserError("training.eval_strategy", f"{cfg.training.eval_strategy!r} needs validation data", "set data.val_csv / data.val_jsonl or eval_strategy: no")
    val_ds = SFTDataset(val_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "val") if want_eval else None

    args = training_arguments(cfg, run_dir, name, val_ds is not None)
    groups = param_groups(model, lm.parts, plan, cfg.training.learning_rate, cfg.training.weight_decay)
    Trainer = _make_trainer_cls()
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=Collator(lm.processor.tokenizer.pad_token_id), vlm_groups=groups,
    )
    resume = get_last_checkpoint(args.output_dir) if cfg.training.resume == "auto" and os.path.isdir(args.output_dir) else None
    if resume:
        log.info("run %s: resuming from %s", name, resume)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t0

    hist = _loss_history(trainer.state.log_history)
    metrics = {
        **hist,
        "final_train_loss": hist["train_loss_history"][-1]["loss"] if hist["train_loss_history"] else hist["train_summary"].get("train_loss"),
        "final_eval_loss": hist["eval_loss_history"][-1]["eval_loss"] if hist["eval_loss_history"] else None,
        "global_step": trainer.state.global_step,
        "train_seconds": train_seconds,
        "resumed_from": resume,
        "n_train_samples": len(train_ds),
        "skipped_overlength": len(train_ds.skipped),
    }
    merged = save_outputs(model, lm, run_dir)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return {"run": name, "run_dir": str(run_dir), "model": merged, "loaded": lm, "encoder": encoder, "metrics": metrics}


def save_outputs(model: torch.nn.Module, lm: LoadedModel, run_dir: Path) -> torch.nn.Module:
    """`lora_adapter/` (plain-peft loadable) and `final/` (merged, plain-transformers loadable)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        def save_adapter(tmp: Path) -> None:
            model.save_pretrained(tmp)
            lm.processor.save_pretrained(tmp)
        _save_dir_atomically(run_dir / "lora_adapter", save_adapter)
        merged = model.merge_and_unload()
    else:
        merged = model

    def save_final(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        lm.processor.save_pretrained(tmp)
    _save_dir_atomically(run_dir / "final", save_final)
    return merged

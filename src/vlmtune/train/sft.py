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
from typing import Any, Callable, Optional

import torch

from ..config import Config, LoraConfig, ModelConfig
from ..data.collate import Collator, Encoder, SFTDataset
from ..data.sources import Sample, load_split
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_yaml, remove_stale_temp_files
from ..models.loading import LoadedModel, load_model
from .checkpoints import last_good_checkpoint
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
        include_num_input_tokens_seen="non_padding",  # tokens/s in ablation_summary.json
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


SAMPLE_INDEX_KEY = "vlmtune_sample_index"
"""Batch key carrying the dataset indices of a training batch's samples (removed before the
model sees the batch)."""


class IndexedDataset(torch.utils.data.Dataset):
    """`dataset[i]` plus its own index `i`.

    The index travels with the features through the sampler, DataLoader workers, the
    Trainer's resume skipping and its gradient-accumulation prefetch, so a batch can always
    name its samples without knowing how any of those ordered them.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], SAMPLE_INDEX_KEY: i}


class IndexCarryingCollator:
    """Wraps a collator: strips `SAMPLE_INDEX_KEY` from the features, collates the rest, and
    puts the indices back as one LongTensor [batch]. Batches without indices (evaluation)
    pass through unchanged."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features or not all(SAMPLE_INDEX_KEY in f for f in features):
            return self.collate(features)
        index = [int(f[SAMPLE_INDEX_KEY]) for f in features]
        batch = self.collate([{k: v for k, v in f.items() if k != SAMPLE_INDEX_KEY} for f in features])
        batch[SAMPLE_INDEX_KEY] = torch.tensor(index, dtype=torch.long)
        return batch


class NonFiniteLoss(UserError):
    """Training met a NaN/inf loss or gradient under `nan_policy: stop`."""


def _finite_grads(grads: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: every gradient entry is finite. The max-abs norm is NaN/inf exactly
    when some entry is, and (unlike the 2-norm) cannot overflow on large finite gradients."""
    inf = float("inf")
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=inf))
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class _NothingLeftToTrain(Exception):
    """Raised at the start of an optimizer step past `max_steps` (see `_StepHooks`)."""


def _make_trainer_cls():
    from transformers import Trainer, TrainerCallback

    class _StepHooks(TrainerCallback):
        """Per-step hooks of `VlmTrainer` (callbacks are the Trainer's public extension points).

        - step begin: forget the previous step's samples / problem, and refuse a step past
          `max_steps`: resumed from the final checkpoint of a run whose last step falls
          mid-epoch (a kill after training, while outputs were being written), the Trainer
          (transformers 5.x) would run the rest of that epoch's first step again, one update
          more than an uninterrupted run;
        - before `optimizer.step()`: the non-finite guard (stop, or drop the update);
        - log at every save/evaluation and at the last step. The Trainer logs the *mean* loss
          since its last log, and a resumed Trainer starts that window at the checkpoint's
          step; logging at every checkpoint makes each window start at a checkpoint or a
          logging step in an uninterrupted run too, so a resumed run's loss history (and its
          final loss, the last window) equals an uninterrupted run's entry for entry.
        """

        def __init__(self, trainer: "VlmTrainer"):
            self.trainer = trainer

        def on_step_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _NothingLeftToTrain()
            self.trainer._step_samples = []
            self.trainer._step_problem = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.trainer._guard_update()

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_evaluate or state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_evaluate:
                control.should_log = True
            return control

    class VlmTrainer(Trainer):
        """transformers' Trainer with one optimizer group per part (LR multipliers) and a
        guard that never lets a NaN/inf loss or gradient reach the weights.

        `nan_policy`: "stop" raises `NonFiniteLoss` (a one-line user error naming the
        optimizer step and the batch's sample ids) before the update, so the last checkpoint
        stays the last good state and nothing else is saved; "skip_batch" drops that
        optimizer step's update (gradients set to None, so the optimizer leaves weights *and*
        its moments untouched; the LR schedule and step counter still advance) and records
        the step in `state.log_history`, which checkpoints persist across resumes.
        `sample_ids[i]` names dataset index i (batches carry indices, see `IndexedDataset`).
        """

        def __init__(self, *args, vlm_groups=None, nan_policy: str = "stop", sample_ids: Optional[list[str]] = None,
                     run_label: str = "training", **kwargs):
            self._vlm_groups = vlm_groups
            self._nan_policy = nan_policy
            self._sample_ids = sample_ids
            self._run_label = run_label
            self._step_samples: list[str] = []
            self._step_problem: Optional[tuple[str, list[str]]] = None
            super().__init__(*args, **kwargs)
            self.add_callback(_StepHooks(self))

        def create_optimizer(self, model=None):
            if self.optimizer is None and self._vlm_groups is not None:
                optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                self.optimizer = optim_cls(self._vlm_groups, **optim_kwargs)
                return self.optimizer
            return super().create_optimizer(model)

        def train(self, *args, **kwargs):
            """`Trainer.train`, or None when the checkpoint it resumed from already ends the
            run (its weights and state are then loaded and nothing else happens)."""
            try:
                return super().train(*args, **kwargs)
            except _NothingLeftToTrain:
                self.is_in_train = False
                log.info("%s: the checkpoint is at the final step %d; nothing left to train", self._run_label, self.state.global_step)
                return None

        def _ids(self, index: Optional[torch.Tensor]) -> list[str]:
            if index is None:
                return []
            idx = index.tolist()
            return [self._sample_ids[i] for i in idx] if self._sample_ids is not None else [f"#{i}" for i in idx]

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = self._ids(inputs.pop(SAMPLE_INDEX_KEY, None))
            self._step_samples.extend(ids)
            loss = super().training_step(model, inputs, num_items_in_batch)
            # One host sync per micro-batch; the Trainer's own NaN/inf logging filter already
            # makes the same one, so this costs no extra stall.
            if not bool(torch.isfinite(loss).all()):
                self._non_finite(f"loss is {loss.float().mean().item()}", ids)
            return loss

        def _non_finite(self, what: str, ids: list[str]) -> None:
            """A micro-batch of the current optimizer step gave a non-finite loss."""
            if self._nan_policy == "stop":
                self._stop(what, ids)
            if self._step_problem is None:
                self._step_problem = (what, ids)

        def _stop(self, what: str, ids: list[str]) -> None:
            step = self.state.global_step + 1
            last = last_good_checkpoint(self.args.output_dir, move_aside=False) if os.path.isdir(self.args.output_dir) else None
            kept = (f"the last good checkpoint {Path(last).name} is kept and a rerun resumes from it" if last
                    else "no checkpoint was written yet")
            raise NonFiniteLoss(
                self._run_label,
                f"{what} at optimizer step {step} (epoch {int(self.state.epoch or 0) + 1}) on samples {', '.join(ids) or '(unknown)'}; "
                f"training stopped before updating the weights, {kept}",
                "check those samples, lower training.learning_rate / max_grad_norm, or set training.nan_policy: skip_batch",
            )

        def _guard_update(self) -> None:
            """Before `optimizer.step()`: refuse or drop an update from non-finite gradients."""
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            problem = self._step_problem
            # Under fp16 a GradScaler owns overflowing gradients: it skips that step itself and
            # lowers its scale, a routine event, not a reason to stop.
            scaled = getattr(self.accelerator, "scaler", None) is not None
            if problem is None and params and not scaled and not bool(_finite_grads([p.grad for p in params])):
                # finite losses but a non-finite gradient (overflow in backward): no single
                # micro-batch to blame, so name every sample of the step
                problem = ("gradient is not finite", self._step_samples)
                if self._nan_policy == "stop":
                    self._stop(*problem)
            if problem is None:
                return
            for p in params:
                p.grad = None  # optimizers skip parameters without a gradient: no update, moments kept
            step = self.state.global_step + 1
            what, ids = problem
            self.state.log_history.append({"nan_skipped_step": step, "reason": what, "samples": list(ids),
                                           "epoch": self.state.epoch, "step": step})
            log.warning("%s: %s at optimizer step %d on samples %s: update skipped (training.nan_policy: skip_batch)",
                        self._run_label, what, step, ", ".join(ids) or "(unknown)")

    return VlmTrainer


def _save_dir_atomically(path: Path, save: Callable[[Path], None]) -> None:
    """Call `save(tmp)` then swap `tmp` into `path`: no half-written output directory.

    A directory cannot be renamed over a non-empty one, so the swap is two renames
    (`path` -> `.path.old`, `tmp` -> `path`); `recover_swapped_dir` undoes a kill between
    them. Until `save` returns, the previous `path` is untouched.
    """
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


def recover_swapped_dir(path: Path) -> None:
    """Undo what a kill inside `_save_dir_atomically` left: a complete previous `path` moved to
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


def _loss_history(log_history: list[dict]) -> dict[str, Any]:
    """Loss curves from `trainer.state.log_history`.

    After a resume that history is the checkpoint's `trainer_state.json` history (everything
    logged up to the checkpoint's step, which is logged by `_StepHooks`) followed by this
    call's entries, so it is complete and has no duplicates: whatever was logged after the
    checkpoint and before a kill was recomputed, identically, by the resumed run.
    `train_summary` is the Trainer's summary of *this call* only (runtime, mean loss of the
    steps it ran).
    """
    train = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"), "epoch": h.get("epoch")} for h in log_history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"], "epoch": h.get("epoch")} for h in log_history if "eval_loss" in h]
    summary = next((h for h in reversed(log_history) if "train_runtime" in h), {})
    skipped = [{"step": h["nan_skipped_step"], "reason": h.get("reason"), "samples": h.get("samples", [])} for h in log_history if "nan_skipped_step" in h]
    return {"train_loss_history": train, "eval_loss_history": evals, "train_summary": summary,
            "skipped_nan_batches": {"count": len(skipped), "steps": [b["step"] for b in skipped], "batches": skipped}}


def prepare_model(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, where: str) -> tuple[LoadedModel, torch.nn.Module, dict]:
    """Load the base model and apply what trains; returns (loaded, model to train, plan)."""
    lm = load_model(mcfg, cfg.visual_encoder_settings, where)
    plan = plan_parts(cfg.training, cfg.visual_encoder_settings)
    model = apply_plan(lm.model, lm.parts, lm.family, plan, variant)
    return lm, model, plan


def train_run(cfg: Config, mcfg: ModelConfig, variant: LoraConfig, train_samples: list[Sample], val_samples: Optional[list[Sample]],
              where: str = "model", callbacks: Optional[list[Any]] = None, extra_metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train one `<model>__<variant>` run; returns a summary (paths, losses, timings).

    Crash safety: with `training.resume: auto` a rerun of the same command continues from the
    newest *complete* checkpoint (`last_good_checkpoint`; a checkpoint half-written by a kill
    is moved aside) and ends where an uninterrupted run ends: weights, optimizer, scheduler
    and RNG states come from the checkpoint (Trainer), the data order is a pure function of
    the seed and the epoch (accelerate's seedable sampler) and the already-trained batches
    of the epoch are skipped (Trainer), and what happens before the Trainer (LoRA/new-weight
    init) is seeded here. Every output file is written atomically.
    """
    from transformers import set_seed

    name = run_name(mcfg, variant)
    run_dir = cfg.resolved_output_dir() / name
    check_precision(cfg, mcfg, where)

    # The Trainer seeds only once it is built, after LoRA adapters and any newly initialised
    # weights got their random init: seed before, so `training.seed` fixes those too and a
    # fresh rerun (killed before its first checkpoint) starts from the same weights.
    set_seed(cfg.training.seed)
    lm, model, plan = prepare_model(cfg, mcfg, variant, where)
    report = parameter_report(model, lm.parts)
    report.update({"model": mcfg.hf_model_id, "family": lm.family_name, "plan": {p: dataclasses.asdict(v) for p, v in plan.items()},
                   "newly_initialized": lm.newly_initialized})
    log.info("run %s: %s\n%s", name, describe_plan(plan), format_report(report))

    encoder = Encoder(lm.processor, lm.family)
    train_ds = SFTDataset(train_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "train")
    want_eval = cfg.training.eval_strategy != "no"
    if want_eval and not val_samples:
        raise UserError("training.eval_strategy", f"{cfg.training.eval_strategy!r} needs validation data", "set data.val_csv / data.val_jsonl or eval_strategy: no")
    val_ds = SFTDataset(val_samples, encoder, cfg.data.max_length, cfg.data.on_overlength, "val") if want_eval else None

    # Only now, with the model loaded, the plan applied and the data encoded (each a place
    # where a user error can still surface), does the run directory appear.
    run_dir.mkdir(parents=True, exist_ok=True)
    for out in ("lora_adapter", "final"):
        recover_swapped_dir(run_dir / out)
    remove_stale_temp_files(run_dir)
    atomic_write_yaml(run_dir / "config.yaml", resolved_run_config(cfg, mcfg, variant))
    atomic_write_json(run_dir / "parameter_report.json", report)

    args = training_arguments(cfg, run_dir, name, val_ds is not None)
    groups = param_groups(model, lm.parts, plan, cfg.training.learning_rate, cfg.training.weight_decay)
    Trainer = _make_trainer_cls()
    trainer = Trainer(
        model=model, args=args, train_dataset=IndexedDataset(train_ds), eval_dataset=val_ds,
        data_collator=IndexCarryingCollator(Collator(lm.processor.tokenizer.pad_token_id)), vlm_groups=groups,
        nan_policy=cfg.training.nan_policy, sample_ids=[s.id for s in train_ds.samples], run_label=f"run {name}",
    )
    for cb in callbacks or []:
        trainer.add_callback(cb)
    resume = last_good_checkpoint(args.output_dir) if cfg.training.resume == "auto" else None
    if resume:
        log.info("run %s: resuming from %s", name, resume)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t0

    hist = _loss_history(trainer.state.log_history)
    final_loss = hist["train_loss_history"][-1]["loss"] if hist["train_loss_history"] else hist["train_summary"].get("train_loss")
    metrics = {
        **hist,
        "final_train_loss": final_loss,
        "final_eval_loss": hist["eval_loss_history"][-1]["eval_loss"] if hist["eval_loss_history"] else None,
        "global_step": trainer.state.global_step,
        "train_seconds": train_seconds,
        "resumed_from": resume,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "peak_memory": _peak_memory(),
        "n_train_samples": len(train_ds),
        "skipped_overlength": len(train_ds.skipped),
        **(extra_metrics or {}),
    }
    merged = save_outputs(model, lm, run_dir)
    # metrics.json last: its presence says the outputs beside it are complete
    atomic_write_json(run_dir / "metrics.json", metrics)
    return {"run": name, "run_dir": str(run_dir), "model": merged, "loaded": lm, "encoder": encoder, "metrics": metrics}


def _peak_memory() -> dict[str, Any]:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda_max_allocated"}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}


def resolved_run_config(cfg: Config, mcfg: ModelConfig, variant: LoraConfig) -> dict[str, Any]:
    """The config of one run as written to its `config.yaml`."""
    resolved = cfg.to_dict()
    resolved["models"] = [dataclasses.asdict(mcfg)]
    resolved["lora_variants"] = [dataclasses.asdict(variant)]
    return resolved


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

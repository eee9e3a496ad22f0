"""Our `training:` config -> `transformers.TrainingArguments`, or any subclass of it (TRL's
`SFTConfig`, `GRPOConfig`).

Every key of `TrainingConfig` whose name is also a field of the arguments class passes
through as it is (`None` = the class's default); the few keys that differ in name or
meaning are translated below, and our own keys (what trains, resume, nan_policy,
generation) stay ours. No hand-kept list of the shared keys: a key added to
`TrainingConfig` under the Trainer's name reaches the Trainer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, TrainingConfig
from ..errors import UserError
from .loggers import tracker_run_name


def shared_keys(args_cls: type) -> list[str]:
    """`TrainingConfig` keys that are also fields of `args_cls`."""
    theirs = {f.name for f in dataclasses.fields(args_cls)}
    return [f.name for f in dataclasses.fields(TrainingConfig) if f.name in theirs]


def training_arguments(cfg: Config, output_dir: Path, run_label: str, has_eval: bool, args_cls: Optional[type] = None,
                       **extra: Any):
    """Build `args_cls` (default `TrainingArguments`) for one run.

    `output_dir` is where checkpoints go; `run_label` names the run for trackers (unless
    `training.run_name` does); `extra` are further fields of `args_cls` (e.g. a TRL config's).
    """
    if args_cls is None:
        from transformers import TrainingArguments as args_cls  # noqa: N813

    t = cfg.training
    kwargs: dict[str, Any] = {k: getattr(t, k) for k in shared_keys(args_cls) if getattr(t, k) is not None}
    eval_strategy = t.eval_strategy if has_eval else "no"
    kwargs.update(
        output_dir=str(output_dir),
        # one precision switch (mixed_precision); the seed's bf16/fp16 flags fold into it on load
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        # transformers 5 has no warmup_ratio: a float warmup_steps < 1 is a ratio (ceil(ratio x
        # steps)), but 1.0 would mean one step; the largest float below 1 gives every step
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else min(t.warmup_ratio, math.nextafter(1.0, 0.0)),
        eval_strategy=eval_strategy,
        load_best_model_at_end=t.load_best_model_at_end and eval_strategy != "no",
        gradient_checkpointing_kwargs=t.gradient_checkpointing_kwargs or {"use_reentrant": False},
        dataloader_num_workers=t.dataloader_num_workers if t.dataloader_num_workers is not None else cfg.data.num_workers,
        run_name=tracker_run_name(cfg, run_label),
        # what vlmtune's batches need
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=os.environ.get("VLMTUNE_NO_PROGRESS") == "1",
        include_num_input_tokens_seen="non_padding",  # tokens/s in ablation_summary.json
    )
    # FSDP is applied by `fsdp.shard_model` before the Trainer sees the model (accelerate would
    # silently fall back to DDP on CPU); the Trainer must not wrap it a second time.
    kwargs.pop("fsdp", None)
    kwargs.pop("fsdp_config", None)
    if t.deepspeed:
        check_deepspeed(t.deepspeed)
    kwargs.update(extra)
    try:
        return args_cls(**kwargs)
    except (ValueError, ImportError) as e:
        raise UserError("training", str(e).splitlines()[0], "fix the training settings named above") from None


def check_deepspeed(path: str) -> None:
    """DeepSpeed (ZeRO-2/3 through the Trainer) needs CUDA and the optional extra."""
    if not Path(path).is_file():
        raise UserError("training.deepspeed", f"{path!r} not found", "point it at a DeepSpeed JSON config (see docs/distributed.md)")
    if not torch.cuda.is_available():
        raise UserError("training.deepspeed", "DeepSpeed needs CUDA GPUs and none is available", "on CPU use training.fsdp under torchrun, or drop training.deepspeed")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("training.deepspeed", "deepspeed is not installed", "pip install 'vlmtune[deepspeed]'") from None

"""What a finished run leaves: the loss curves for `metrics.json`, peak memory, and the
weights (`lora_adapter/`, `final/`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .. import dist
from ..models.loading import LoadedModel, merge_adapter_full_precision
from ..models.processors import save_processor
from .rundir import RunDir, save_dirs_atomically
from .throughput import THROUGHPUT_KEYS


def loss_history(log_history: list[dict]) -> dict[str, Any]:
    """Loss curves from `trainer.state.log_history`.

    After a resume that history is the checkpoint's `trainer_state.json` history (everything
    logged up to the checkpoint's step, which `guard.StepHooks` logs) followed by this call's
    entries, so it is complete and has no duplicates: whatever was logged after the
    checkpoint and before a kill was recomputed, identically, by the resumed run.
    `train_summary` is the Trainer's summary of *this call* only (runtime, mean loss of the
    steps it ran).
    """
    train = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"), "epoch": h.get("epoch")} for h in log_history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"], "epoch": h.get("epoch")} for h in log_history if "eval_loss" in h]
    summary = next((h for h in reversed(log_history) if "train_runtime" in h), {})
    rates = [{"step": h["step"], **{k: h[k] for k in THROUGHPUT_KEYS if k in h}} for h in log_history if "loss" in h and "tokens_per_second" in h]
    skipped = [{"step": h["nan_skipped_step"], "reason": h.get("reason"), "samples": h.get("samples", [])} for h in log_history if "nan_skipped_step" in h]
    return {"train_loss_history": train, "eval_loss_history": evals, "throughput_history": rates, "train_summary": summary,
            "skipped_nan_batches": {"count": len(skipped), "steps": [b["step"] for b in skipped], "batches": skipped}}


def run_metrics(trainer: Any, resume: Optional[str], train_seconds: float, **fields: Any) -> dict[str, Any]:
    """What every recipe's `metrics.json` holds: the loss curves, the final losses, steps,
    time, memory and world size; `fields` add the recipe's own (they win)."""
    hist = loss_history(trainer.state.log_history)
    meter = getattr(trainer, "throughput", None)
    if meter is not None:
        meter.sync()  # a collective: every rank calls run_metrics
    final_loss = hist["train_loss_history"][-1]["loss"] if hist["train_loss_history"] else hist["train_summary"].get("train_loss")
    return {
        **hist,
        "final_train_loss": final_loss,
        "final_eval_loss": hist["eval_loss_history"][-1]["eval_loss"] if hist["eval_loss_history"] else None,
        "global_step": trainer.state.global_step,
        "train_seconds": train_seconds,
        "resumed_from": resume,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "peak_memory": peak_memory(),
        "throughput": meter.summary() if meter is not None else None,
        "world_size": dist.world_size(),
        **fields,
    }


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda_max_allocated"}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}


def save_outputs(model: torch.nn.Module, lm: LoadedModel, run_dir: Union[RunDir, str, os.PathLike],
                 rebuild: Optional[Callable[[], torch.nn.Module]] = None) -> Optional[torch.nn.Module]:
    """`lora_adapter/` (plain-peft loadable) and `final/` (merged, plain-transformers loadable),
    written by rank 0 while the other ranks wait.

    Returns the merged model on rank 0 (for evaluation), None on the other ranks. An
    FSDP-sharded `model` is first gathered (every rank joins) into an unsharded copy on
    rank 0 that `rebuild()` makes: the model as it was before sharding, same names.
    """
    from .fsdp import full_state_dict, is_sharded

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    if is_sharded(model):
        if rebuild is None:
            raise ValueError("save_outputs: a sharded model needs rebuild()")
        sd = full_state_dict(model)
        model = None
        if dist.is_main():
            model = rebuild()
            model.load_state_dict(sd)
    merged = _write_outputs(model, lm, rd) if dist.is_main() else None
    dist.barrier()
    return merged


def _write_outputs(model: torch.nn.Module, lm: LoadedModel, rd: RunDir) -> torch.nn.Module:
    from peft import PeftModel

    outputs = []
    merged = model
    if isinstance(model, PeftModel):
        def save_adapter(tmp: Path) -> None:
            nonlocal merged
            model.save_pretrained(tmp)
            save_processor(lm.processor, lm.family, tmp)
            # QLoRA: merging into 4/8-bit weights would round the trained delta away; final/ is
            # the adapter on the full-precision base (what plain peft gives from lora_adapter/)
            merged = merge_adapter_full_precision(lm, tmp) if lm.quant_bits else model.merge_and_unload()
        outputs.append((rd.lora_adapter, save_adapter))

    def save_final(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        # as `vlmtune export` saves it: AutoProcessor/AutoImageProcessor load final/ as it is
        save_processor(lm.processor, lm.family, tmp)
    outputs.append((rd.final, save_final))
    save_dirs_atomically(outputs)  # both written, then both swapped in
    return merged

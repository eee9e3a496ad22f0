"""Step metrics: tokens/s (all and supervised), padding and image-token fractions, peak memory
and, on a GPU, model FLOPs utilisation -- logged with every training loss log and saved in
`metrics.json` (`throughput`).

Counting happens in `training_step`, on the batch the model sees (per micro-batch, per rank):
- `tokens`: every position of the batch, padding included -- [B, T] -> B*T;
- `real_tokens`: positions that are not padding (the [B, T] `attention_mask` sum). Packed
  batches: one concatenated row (position-id families) has no padding and no mask, so all
  of it; one row per bin (explicit-mask families) carries its [bins, L] padding mask, so the
  end of the shorter bins counts as padding (the explicit mask replaces it only at the
  model call, train/packing.py);
- `supervised`: labels != -100 (the tokens the loss is taken on);
- `image_tokens`: input ids equal to the model's image token (the expanded image placeholders).
Time is the wall clock between the Trainer's step begin and step end callbacks: forward,
backward and optimizer, not evaluation, checkpoint writing or the fetch of the step's first
micro-batches.

The counters and seconds live in `trainer_state.json` of every checkpoint (the callback is a
transformers `ExportableState`), and a resumed run starts from them, so its rates cover the
whole run and not only the time since the resume. Across ranks the counts are summed and the
seconds are rank 0's (ranks step in lockstep).

FLOP convention (MFU, GPU only): model FLOPs per real token = 2*N (forward) + 2*N (gradients
of the activations) + 2*N_trainable (gradients of the trainable weights), N = all parameters;
attention's sequence-length term is left out (as in the PaLM paper's 6N, which this equals
for a full fine-tune; a LoRA run does not get credit for weight gradients it never computes).
MFU = model FLOPs/s / the GPU's dense bf16 peak (`PEAK_BF16_FLOPS`, or the environment
variable VLMTUNE_PEAK_TFLOPS for any other device).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import dist
from ..data.collate import IGNORE_INDEX

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L4": 121.0e12,
    "A10": 125.0e12,
}

_COUNTERS = ("tokens", "real_tokens", "supervised", "image_tokens", "seconds")
THROUGHPUT_KEYS = ("tokens_per_second", "supervised_tokens_per_second", "padding_fraction", "image_token_fraction", "peak_memory_gb", "mfu")
"""What each training loss log gains (`mfu` only on a GPU with a known peak)."""


def peak_flops() -> Optional[float]:
    """The current CUDA device's dense bf16 peak in FLOP/s; None when unknown or on a CPU."""
    env = os.environ.get("VLMTUNE_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def count_batch(inputs: Any, image_token_id: Optional[int]) -> dict[str, Any]:
    """Token counts of one micro-batch (see the module docstring); zeros for batches that are
    not token tensors (a GRPO row list). Counts that need the data are 0-d tensors on the
    batch's device: reading them would stall a GPU every micro-batch, so `ThroughputMeter`
    adds them up there and reads them once per log."""
    if not isinstance(inputs, dict) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        return dict.fromkeys(_COUNTERS[:-1], 0)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    return {
        "tokens": ids.numel(),
        "real_tokens": mask.sum() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel(),
        "supervised": (labels != IGNORE_INDEX).sum() if isinstance(labels, torch.Tensor) else 0,
        "image_tokens": (ids == image_token_id).sum() if image_token_id is not None else 0,
    }


class ThroughputMeter(TrainerCallback, ExportableState):
    """Owns the run's counters and step clock; saved in and restored from checkpoints."""

    def __init__(self, n_params: int = 0, n_trainable: int = 0):
        self.n_params = n_params
        self.n_trainable = n_trainable
        self.totals = dict.fromkeys(_COUNTERS, 0.0)
        self._pending: dict[str, Any] = dict.fromkeys(_COUNTERS[:-1], 0)  # this rank's counts since the last sync
        self._t0: Optional[float] = None

    def state(self) -> dict:
        return {"args": {"n_params": self.n_params, "n_trainable": self.n_trainable}, "attributes": {"totals": dict(self.totals)}}

    def add(self, counts: dict[str, Any]) -> None:
        for k, v in counts.items():
            self._pending[k] = self._pending[k] + v  # tensors stay on their device until `sync`

    def sync(self) -> None:
        """Fold every rank's pending counts into the totals (a collective: all ranks call it)."""
        keys = list(self._pending)
        t = torch.tensor([float(self._pending[k]) for k in keys], dtype=torch.float64)
        if dist.world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            t = t.to(dev)
            torch.distributed.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            self.totals[k] += v
        self._pending = dict.fromkeys(keys, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer has loaded the checkpoint's trainer_state.json: continue its totals.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and "totals" in saved.get("attributes", {}):
            self.totals = {k: float(saved["attributes"]["totals"].get(k, 0.0)) for k in _COUNTERS}
        elif state.stateful_callbacks is not None:
            # a checkpoint written before this meter existed: the Trainer's save would look
            # its entry up and fail; its rates then cover the time since the resume
            state.stateful_callbacks[type(self).__name__] = self.state()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.totals["seconds"] += time.perf_counter() - self._t0
            self._t0 = None

    def metrics(self) -> dict[str, Any]:
        """Rates over the whole run so far (call `sync` first)."""
        tot, sec = self.totals, self.totals["seconds"]
        out: dict[str, Any] = {
            "tokens_per_second": tot["real_tokens"] / sec if sec else None,
            "supervised_tokens_per_second": tot["supervised"] / sec if sec else None,
            "padding_fraction": 1 - tot["real_tokens"] / tot["tokens"] if tot["tokens"] else None,
            "image_token_fraction": tot["image_tokens"] / tot["real_tokens"] if tot["real_tokens"] else None,
            "peak_memory_gb": _peak_memory_bytes() / 2**30,
        }
        peak = peak_flops()
        if peak and sec and self.n_params:
            flops_per_token = 4 * self.n_params + 2 * self.n_trainable
            out["mfu"] = flops_per_token * tot["real_tokens"] / sec / (peak * dist.world_size())
        return out

    def summary(self) -> dict[str, Any]:
        """For metrics.json: the rates, the counts they come from, and the conventions."""
        return {**self.metrics(), **{k: (int(v) if k != "seconds" else v) for k, v in self.totals.items()},
                "time": "wall clock from step begin to step end (forward, backward, optimizer)",
                "flop_convention": "MFU = (4 N + 2 N_trainable) x real tokens/s / dense bf16 peak, attention term excluded"}


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ThroughputMixin:
    """Mixin for a `transformers.Trainer` subclass: counts every training micro-batch and adds
    the step metrics to each training loss log.

    Constructor keyword: `image_token_id` (the token image placeholders expand to; None: no
    image-token fraction).
    """

    def __init__(self, *args: Any, image_token_id: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._image_token_id = image_token_id
        params = list(self.model.parameters())
        self.throughput = ThroughputMeter(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
        self.add_callback(self.throughput)

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        self.throughput.add(count_batch(inputs, self._image_token_id))  # before the loss pops labels
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log: every rank is here at the same step
            self.throughput.sync()
            logs.update({k: v for k, v in self.throughput.metrics().items() if v is not None})
        super().log(logs, start_time)

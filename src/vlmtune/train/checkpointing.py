"""Trainer checkpoints that resume what was saved, sharded or not.

A mixin for any `transformers.Trainer` subclass:

- an FSDP2-sharded model (`fsdp.py`): every rank joins the gather of full tensors, rank 0
  writes the usual files (`model.safetensors` / `adapter_model.safetensors`, `optimizer.pt`,
  `scheduler.pt`), and a resume scatters them back into the shards;
- a whole model (no LoRA): transformers 5 saves `model.safetensors` in the hub's key layout
  (`model.layers.*`, `visual.*`), not the runtime one (`model.language_model.layers.*`), and
  the Trainer reloads it with `load_state_dict(strict=False)`: no key matches, a warning is
  all, and training goes on from the initial weights. The checkpoint is read back through
  `from_pretrained` (which maps the keys) -- the auto class `models.loading` loads with, and
  a remote-code model's own code (copied into the checkpoint by `save_pretrained`) -- and
  loaded strictly;
- an adapter checkpoint of an unsharded model: the Trainer's own path (peft maps its keys).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from .. import dist
from ..errors import UserError
from .fsdp import full_state_dict, is_sharded


def _whole_model_state(model: nn.Module, ckpt: str) -> dict[str, torch.Tensor]:
    """A whole-model checkpoint's tensors under `model`'s runtime names, loaded as
    `models.loading.load_model` loads (the same auto-class choice). Remote code is trusted
    exactly when `model` runs remote code: the run's config trusted it to load the model at
    all, and this checkpoint is the run's own save of that model."""
    from ..config import ModelConfig
    from ..models.loading import load_pretrained, runs_remote_code

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    mcfg = ModelConfig(name="checkpoint", hf_model_id=ckpt, trust_remote_code=runs_remote_code(model))
    loaded, _ = load_pretrained(ckpt, mcfg, ckpt, dtype=dtype)
    return loaded.state_dict()


class CheckpointMixin:
    """See the module docstring."""

    def _sharded(self) -> bool:
        return is_sharded(self.model)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        if not self._sharded():
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        sd = full_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=sd)
        dist.barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's optimizer
        osd = get_optimizer_state_dict(self.model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            torch.save(osd, os.path.join(output_dir, "optimizer.pt"))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        dist.barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        adapter = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if not self._sharded():
            if os.path.isfile(adapter):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            target = model if model is not None else self.model
            try:
                target.load_state_dict(_whole_model_state(target, resume_from_checkpoint), strict=True)
            except RuntimeError as e:
                raise UserError(resume_from_checkpoint, f"does not fit this model ({str(e).splitlines()[0][:160]})",
                                "resume with the settings the run started with, or set training.resume: never") from None
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        names = list(get_model_state_dict(self.model).keys())
        if os.path.isfile(adapter):
            from safetensors.torch import load_file

            saved = load_file(adapter)
            # peft saves `...lora_A.default.weight` as `...lora_A.weight` and a fully trained
            # module's copy `...merger.modules_to_save.default.mlp.0.weight` as `...merger.mlp.0.weight`
            want = {n.replace(".modules_to_save.default", "").replace(".default", ""): n
                    for n in names if ".modules_to_save.default" in n or ".lora_" in n}
            sd = {want.get(k, k): v for k, v in saved.items()}
        else:
            sd = _whole_model_state(self.model, resume_from_checkpoint)
        n_saved = len(sd)
        res = set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        missing = [k for k in res.missing_keys if not os.path.isfile(adapter) or ".lora_" in k or "modules_to_save" in k]
        if missing or res.unexpected_keys:
            raise UserError(resume_from_checkpoint, f"does not fit this model ({len(missing)} missing, {len(res.unexpected_keys)} unexpected of {n_saved} tensors)",
                            "resume with the settings the run started with, or set training.resume: never")

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None or not self._sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        # optimizer.pt is our own full state dict, written by this mixin (safe to unpickle tensors + ints)
        optim_file, sched_file = os.path.join(checkpoint, "optimizer.pt"), os.path.join(checkpoint, "scheduler.pt")
        osd = torch.load(optim_file, weights_only=True)
        set_optimizer_state_dict(self.model, opt, osd, options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(sched_file, weights_only=True))

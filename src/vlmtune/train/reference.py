"""The GRPO reference policy: no second copy under LoRA, a frozen copy under full training,
and the frozen claim checked before the first step (seed 000's three start-up lines).

TRL's GRPOTrainer, handed a peft model with beta > 0, adds a second adapter "ref" (a copy of
the LoRA weights and of every fully trained module) and computes the reference with it. The
run starts from a fresh adapter, so that copy equals the base: it is deleted, and TRL then
computes the reference under `disable_adapter()`: the base weights the policy already holds.
Under full training TRL loads the model again (`ref_model`), with every parameter still
trainable: it is frozen here and checked against the policy's start.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import dist
from ..errors import UserError

log = logging.getLogger("vlmtune")


class ReferenceNotFrozen(UserError):
    """The reference policy could change during training."""


def reference_parameters(trainer: Any) -> tuple[str, list[tuple[str, torch.nn.Parameter]]]:
    """(kind, named reference parameters): "none" (beta 0), "copy" (trainer.ref_model), or
    "adapter-disabled" (every parameter of the peft policy outside an adapter: what runs
    under `disable_adapter()`)."""
    from peft import PeftModel

    if getattr(trainer, "beta", 0.0) == 0.0:
        return "none", []
    if getattr(trainer, "ref_model", None) is not None:
        return "copy", list(trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters())
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        adapters = list(model.peft_config)
        return "adapter-disabled", [(n, p) for n, p in model.named_parameters() if not any(f".{a}." in n for a in adapters)]
    return "none", []


def policy_parameter_count(trainer: Any) -> int:
    """Parameters the policy computes with (peft's `original_module` copies excluded: the
    trained copies stand in for them)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return sum(p.numel() for n, p in model.named_parameters() if ".original_module." not in n)


def check_reference_frozen(trainer: Any, optimizer: Any) -> None:
    """No reference parameter requires grad, none is in the optimizer, and a copy shares no
    tensor with the policy; logs seed 000's three lines, or raises `ReferenceNotFrozen`."""
    kind, ref = reference_parameters(trainer)
    if kind == "none":
        if dist.is_main():
            log.info("INFO: beta = 0: no reference policy is built")
        return
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else set()
    grad = [n for n, p in ref if p.requires_grad]
    in_opt = [n for n, p in ref if id(p) in in_optimizer]
    shared = []
    if kind == "copy":
        policy = {id(p) for p in trainer.model.parameters()}
        shared = [n for n, p in ref if id(p) in policy]
    if dist.is_main():
        log.info("INFO: VLM Policy parameters: %s", f"{policy_parameter_count(trainer):,}")
        log.info("INFO: Reference policy parameters: %s (%s)", f"{sum(p.numel() for _, p in ref):,}", kind)
    if grad or in_opt or shared:
        raise ReferenceNotFrozen(
            "grpo reference policy",
            f"not frozen: {len(grad)} parameter(s) require grad (e.g. {', '.join(grad[:2]) or '-'}), {len(in_opt)} are in the optimizer, "
            f"{len(shared)} are shared with the policy; training stopped before the first step",
            "this is a bug in what trains (training.parts) or in a custom trainer; report it with the config",
        )
    if dist.is_main():
        log.info("INFO: Reference policy properly frozen")


class ReferencePolicyMixin:
    """Mixin for TRL's GRPOTrainer (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from peft import PeftModel
        from transformers import TrainerCallback

        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel) and "ref" in model.peft_config:
            model.delete_adapter("ref")  # the reference is the base, under disable_adapter()
        if getattr(self, "ref_model", None) is not None:
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
            policy = dict(model.named_parameters())
            differ = [n for n, p in self.accelerator.unwrap_model(self.ref_model).named_parameters()
                      if n in policy and not torch.equal(p.detach().cpu(), policy[n].detach().cpu())]
            if differ:
                raise ReferenceNotFrozen("grpo reference policy", f"the reference loaded for the KL term differs from the policy's start ({differ[0]}, ...)",
                                         "start from weights saved on disk (grpo.init_from or the model's own), not from weights changed in memory")
        trainer = self

        class CheckReference(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                check_reference_frozen(trainer, optimizer if optimizer is not None else trainer.optimizer)

        self.add_callback(CheckReference())

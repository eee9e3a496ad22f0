"""Apply a resolved plan to the weights: freeze everything, then LoRA-wrap the resolved
targets and mark the fully trained modules (peft `modules_to_save` when any part uses LoRA,
so `lora_adapter/` is complete on its own)."""

from __future__ import annotations

import logging
from typing import Optional

import torch.nn as nn

from ..config import LoraConfig
from ..models.families import Family, PartMap
from .plan import Plan, Trainables, resolve_trainables, strip_wrappers

log = logging.getLogger("vlmtune")

# Kept under its old name: tests and callers strip peft names with it.
strip_peft = strip_wrappers


def apply_plan(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> nn.Module:
    """Freeze/LoRA/full per part. Returns the model to train (a PeftModel when any part uses LoRA).

    `plan` is updated in place to the plan as it runs (see `Trainables.plan`).
    """
    res = resolve_trainables(model, parts, family, plan, lora)
    for p, pp in res.plan.items():
        plan[p].train = pp.train
    return apply_trainables(model, parts, res, lora)


def apply_trainables(model: nn.Module, parts: PartMap, res: Trainables, lora: LoraConfig) -> nn.Module:
    """Apply an already resolved plan (see `plan.resolve_trainables`)."""
    model.requires_grad_(False)
    if not res.uses_lora:
        for name, p in model.named_parameters():
            if res.trains_fully(name, parts):
                p.requires_grad_(True)
        return model

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if res.loose_roots:
        log.warning("%s: bare parameter(s) that a LoRA adapter cannot carry; frozen in this run (train every part full or frozen to train them)", ", ".join(res.loose_roots))
    cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=res.lora_targets, modules_to_save=res.modules_to_save or None,
    )
    pm = get_peft_model(model, cfg)  # adapter dtype: see precision.cast_trainables
    if res.never:
        for name, p in pm.named_parameters():
            if strip_wrappers(name).startswith(res.never):
                p.requires_grad_(False)
    return pm

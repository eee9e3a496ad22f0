"""Part-wise optimizer groups: one group per (part, decay class), lr = learning_rate x the
part's multiplier; biases and norm weights (1-D tensors) get no weight decay.

`PartwiseOptimizerMixin` puts them into any `transformers.Trainer` subclass (ours, TRL's).
The groups are built inside `create_optimizer`, i.e. from the model the Trainer holds at
that moment: under FSDP the Trainer creates the optimizer only after wrapping, so the groups
hold the sharded parameters (FSDP2 keeps each parameter's name; FSDP1's infixes are
stripped by `strip_wrappers`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch.nn as nn

from ..models.families import PartMap
from .plan import Plan, strip_wrappers

log = logging.getLogger("vlmtune")


def param_groups(model: nn.Module, parts: PartMap, plan: Plan, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: one per (part, decay) with lr = learning_rate * part multiplier.

    Each group also carries `part` and `decay` (ignored by torch optimizers; read by tests
    and logs). Biases and norm weights (tensors with fewer than 2 dims) get no weight decay.
    """
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = parts.part_of(strip_wrappers(name))
        mult = plan[part].lr_multiplier if part in plan else 1.0
        decay = p.dim() >= 2
        g = groups.setdefault((part, decay), {"params": [], "lr": learning_rate * mult, "weight_decay": weight_decay if decay else 0.0,
                                              "part": part, "decay": decay})
        g["params"].append(p)
    return list(groups.values())


class PartwiseOptimizerMixin:
    """Mixin for a `transformers.Trainer` subclass: the optimizer gets `param_groups`.

    Pass `part_map` and `part_plan` to the constructor; without them the Trainer's own
    optimizer is used. The optimizer class and its other settings (betas, eps, fused...) come
    from `TrainingArguments.optim` as usual.
    """

    def __init__(self, *args: Any, part_map: Optional[PartMap] = None, part_plan: Optional[Plan] = None, **kwargs: Any):
        self.part_map = part_map
        self.part_plan = part_plan
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Optional[nn.Module] = None):
        if self.optimizer is None and self.part_map is not None and self.part_plan is not None:
            model = model if model is not None else self.model
            groups = param_groups(model, self.part_map, self.part_plan, self.args.learning_rate, self.args.weight_decay)
            optim_cls, optim_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optim_cls(groups, **optim_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

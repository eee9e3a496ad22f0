"""What trains: per part (vision, projector, llm) frozen | lora | full, each with its own
learning-rate multiplier (seeds 002 and 000).

`plan_parts` turns the config into a `Plan`; `apply_plan` freezes, wraps LoRA (targets scoped
to their part: LLM targets never wrap vision modules) and marks fully-trained parts; then
`param_groups` gives the optimizer one group per part and decay class, with
lr = learning_rate * lr_multiplier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import TRAINING_MODES, LoraConfig, TrainingConfig, VisualEncoderSettings
from ..errors import UserError
from ..models.families import PART_NAMES, Family, PartMap

log = logging.getLogger("vlmtune")

PEFT_PREFIX = "base_model.model."


@dataclass
class PartPlan:
    train: str  # frozen | lora | full
    lr_multiplier: float


Plan = dict[str, PartPlan]


def plan_parts(training: TrainingConfig, ve: VisualEncoderSettings, mode: Optional[str] = None) -> Plan:
    """Resolve `training_mode` + per-part overrides + visual encoder settings into a plan.

    Modes: projector = projector only (stage 1); llm = projector + LLM; vision = projector +
    vision; both = all three. The projector trains in every mode (full by default); LLM and
    vision train with LoRA by default.
    """
    mode = mode or training.training_mode
    if mode not in TRAINING_MODES:
        raise UserError("training_mode", f"unknown mode {mode!r}", f"use one of {', '.join(TRAINING_MODES)}")
    plan: Plan = {
        "vision": PartPlan("lora" if mode in ("vision", "both") and not ve.freeze_visual_encoder else "frozen", ve.visual_learning_rate_multiplier),
        "projector": PartPlan("full", 1.0),
        "llm": PartPlan("lora" if mode in ("llm", "both") else "frozen", 1.0),
    }
    for part, override in training.parts.items():
        if override.train is not None:
            plan[part].train = override.train
        if override.lr_multiplier is not None:
            plan[part].lr_multiplier = override.lr_multiplier
    if plan["projector"].train == "frozen":
        raise UserError("training.parts.projector.train", "the projector trains in every mode", "use full or lora")
    return plan


def describe_plan(plan: Plan) -> str:
    return ", ".join(f"{p} {plan[p].train}" + (f" (lr x{plan[p].lr_multiplier:g})" if plan[p].train != "frozen" else "") for p in PART_NAMES)


def _linear_modules(model: nn.Module, parts: PartMap, part: str) -> dict[str, nn.Module]:
    """nn.Linear modules of `part` (by longest-prefix ownership), lm_head excluded."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and parts.part_of(name) == part and name.rsplit(".", 1)[-1] != "lm_head":
            out[name] = mod
    return out


def lora_target_names(model: nn.Module, parts: PartMap, family: Optional[Family], part: str, targets: Optional[list[str]]) -> list[str]:
    """Exact module names to wrap with LoRA in `part`.

    `targets` are leaf names (`q_proj`) or dotted suffixes (`mlp.0`); None = the family's
    default for the part, or every linear layer of the part.
    """
    linears = _linear_modules(model, parts, part)
    if targets is None and family is not None:
        targets = list(family.lora_targets.get(part) or []) or None
    if targets is None:
        return sorted(linears)
    names = []
    for t in targets:
        hit = [n for n in linears if n == t or n.endswith("." + t)]
        if not hit:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(f"lora {part}_target_modules", f"{t!r} matches no linear module in the {part}", f"linear leaf names there: {', '.join(leaves) or 'none'}")
        names += hit
    return sorted(set(names))


def _parts_without_lora_targets(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> list[str]:
    """LoRA parts with no linear layer to adapt (Gemma 3's projector is one bare matrix)."""
    per_part = {"llm": lora.llm_target_modules, "vision": lora.vision_target_modules, "projector": lora.projector_target_modules}
    return [p for p in PART_NAMES if plan[p].train == "lora" and parts.roots.get(p) and not lora_target_names(model, parts, family, p, per_part[p])]


def apply_plan(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> nn.Module:
    """Freeze/LoRA/full per part. Returns the model to train (a PeftModel when any part uses LoRA)."""
    missing = [p for p in parts.missing() if plan[p].train != "frozen"]
    if missing:
        whole = plan["vision"].train != "frozen" and plan["llm"].train != "frozen"  # training_mode: both
        name = type(model).__name__
        if parts.unresolved and whole:
            # Every parameter counts as the LLM: training it trains the whole model.
            log.warning("%s: %s; training the whole model as one part (LoRA on every linear layer, or full)", name, parts.unresolved)
            for p in missing:
                plan[p].train = "frozen"  # nothing is in these parts; the plan says so
        else:
            why = parts.unresolved or f"its {family.name if family else 'generic'} spec names no such module"
            raise UserError(
                "training_mode",
                f"{name}: the {', '.join(missing)} part(s) cannot train separately because {why}",
                "use training_mode: both (trains the whole model), or set model_type to a supported family",
            )
    model.requires_grad_(False)
    for p in _parts_without_lora_targets(model, parts, family, plan, lora):
        log.warning("%s: the %s has no linear layer for LoRA; training it fully instead", type(model).__name__, p)
        plan[p].train = "full"
    lora_parts = [p for p in PART_NAMES if plan[p].train == "lora"]
    full_parts = [p for p in PART_NAMES if plan[p].train == "full"]
    never = family.never_trained_in(model) if family else ()
    if not lora_parts:
        for name, p in model.named_parameters():
            if parts.part_of(name) in full_parts and not name.startswith(never):
                p.requires_grad_(True)
        return model

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    per_part = {"llm": lora.llm_target_modules, "vision": lora.vision_target_modules, "projector": lora.projector_target_modules}
    targets: list[str] = []
    for p in lora_parts:
        # LoRA inside a module that never gets a gradient would be dead weight (and trip DDP)
        targets += [t for t in lora_target_names(model, parts, family, p, per_part[p]) if not (t + ".").startswith(never or ("\0",))]
    modules_to_save = [root for p in full_parts for root in parts.roots[p]]
    # peft refuses to wrap a ModuleList/ModuleDict (Qwen3-VL's deepstack_merger_list): save its
    # children instead, whatever their number.
    mods = dict(model.named_modules())
    modules_to_save = [
        c for root in modules_to_save
        for c in ([f"{root}.{k}" for k in mods[root]._modules] if isinstance(mods.get(root), (nn.ModuleList, nn.ModuleDict)) else [root])
    ]
    # A part root that is a bare parameter (BLIP-2's query_tokens) is no module: peft can
    # neither wrap it nor save it in the adapter, so it stays frozen while any part uses LoRA.
    loose = [r for r in modules_to_save if r not in mods]
    if loose:
        log.warning("%s: bare parameter(s) that a LoRA adapter cannot carry; frozen in this run (train every part full or frozen to train them)", ", ".join(loose))
        modules_to_save = [r for r in modules_to_save if r in mods]
    for root in modules_to_save:
        inner = [t for t in targets if t.startswith(root + ".")]
        if inner:
            raise UserError("training.parts", f"{root} trains fully but contains LoRA targets of another part ({inner[0]})", "train the enclosing part with lora too, or freeze the inner part")
    cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=targets, modules_to_save=modules_to_save or None,
    )
    pm = get_peft_model(model, cfg)
    if never:
        for name, p in pm.named_parameters():
            if strip_peft(name).startswith(never):
                p.requires_grad_(False)
    return pm


def strip_peft(name: str) -> str:
    """Parameter name as in the plain model: drop peft's wrapper prefixes and infixes."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    for infix in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(infix, "")
    return name


def param_groups(model: nn.Module, parts: PartMap, plan: Plan, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: one per (part, decay) with lr = learning_rate * part multiplier.

    Biases and norm weights (1-D tensors) get no weight decay.
    """
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = parts.part_of(strip_peft(name))
        mult = plan[part].lr_multiplier if part in plan else 1.0
        decay = p.dim() >= 2
        g = groups.setdefault((part, decay), {"params": [], "lr": learning_rate * mult, "weight_decay": weight_decay if decay else 0.0, "part": part})
        g["params"].append(p)
    return list(groups.values())


def parameter_report(model: nn.Module, parts: PartMap) -> dict[str, Any]:
    """Seed 000's load report: parameters by part, total and trainable.

    Counts the model's own weights once (LoRA weights and peft's trainable copies of
    fully-trained modules count as trainable, not as extra total).
    """
    by_part = {p: {"total": 0, "trainable": 0} for p in (*PART_NAMES, "other")}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        plain = strip_peft(name)
        part = parts.part_of(plain)
        extra = ".lora_" in name or ".modules_to_save." in name
        if not extra:
            by_part[part]["total"] += p.numel()
        if p.requires_grad:
            by_part[part]["trainable"] += p.numel()
    total = sum(v["total"] for v in by_part.values())
    trainable = sum(v["trainable"] for v in by_part.values())
    return {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "visual_encoder_parameters": by_part["vision"]["total"],
        "projector_parameters": by_part["projector"]["total"],
        "text_model_parameters": by_part["llm"]["total"],
        "parts": by_part,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'part':<10} {'total':>14} {'trainable':>14}"]
    for part, v in report["parts"].items():
        lines.append(f"{part:<10} {v['total']:>14,} {v['trainable']:>14,}")
    lines.append(f"{'all':<10} {report['total_parameters']:>14,} {report['trainable_parameters']:>14,}  ({report['trainable_percent']:.2f}% trainable)")
    return "\n".join(lines)


def estimate_trainable(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> dict[str, int]:
    """Trainable parameters per part if `plan` were applied (without applying it):
    full parts count whole, LoRA parts count r*(in+out) per target linear."""
    modules = dict(model.named_modules())
    per_part = {"llm": lora.llm_target_modules, "vision": lora.vision_target_modules, "projector": lora.projector_target_modules}
    out = {p: 0 for p in PART_NAMES}
    no_targets = _parts_without_lora_targets(model, parts, family, plan, lora)  # trained fully
    never = family.never_trained_in(model) if family else ()
    # as apply_plan: bare-parameter roots cannot ride in a LoRA adapter, so they stay frozen
    uses_lora = any(plan[q].train == "lora" and parts.roots.get(q) and q not in no_targets for q in PART_NAMES)
    frozen_roots = {r for q in PART_NAMES for r in parts.roots.get(q, []) if r not in modules} if uses_lora else set()
    for p in PART_NAMES:
        if plan[p].train == "full" or p in no_targets:
            out[p] = sum(x.numel() for n, x in model.named_parameters()
                         if parts.part_of(n) == p and not (never and n.startswith(never)) and n not in frozen_roots)
        elif plan[p].train == "lora" and parts.roots.get(p):
            for n in lora_target_names(model, parts, family, p, per_part[p]):
                if never and (n + ".").startswith(never):
                    continue
                m = modules[n]
                out[p] += (lora.r or 16) * (m.in_features + m.out_features)
    return out

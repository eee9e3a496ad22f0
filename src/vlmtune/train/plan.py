"""What trains: per part (vision, projector, llm) frozen | lora | full, each with its own
learning-rate multiplier (seeds 002 and 000).

Two steps, both without touching weights:

- `plan_parts`: the config alone -> a `Plan` (one `PartPlan` per part);
- `resolve_trainables`: the plan against a model's structure -> `Trainables`, the exact
  LoRA target modules, the modules trained fully, and what stays frozen.

`adapt.apply_plan` applies a `Trainables` to the weights, and `estimate_trainable` (what
`vlmtune inspect` prints) counts one: inspect's estimate and the run's real trainable count
come from the same resolution.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn

from ..config import TRAINING_MODES, LoraConfig, TrainingConfig, VisualEncoderSettings
from ..errors import UserError
from ..models.families import PART_NAMES, Family, PartMap

log = logging.getLogger("vlmtune")

PEFT_PREFIX = "base_model.model."
# Name pieces that wrappers insert into parameter names: peft (adapter copies, the wrapped
# base layer), FSDP1 with use_orig_params, activation checkpointing, DDP.
_WRAPPER_INFIXES = (".modules_to_save.default", ".original_module", ".base_layer", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


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


def strip_wrappers(name: str) -> str:
    """Parameter name as in the plain model: drop peft's, FSDP's, checkpointing's and DDP's
    prefixes and infixes."""
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


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


def _part_targets(lora: LoraConfig) -> dict[str, Optional[list[str]]]:
    # the projector's LoRA targets are the family's (seed 002's `projector_target_modules`
    # name modules that always train fully: see `always_trained`)
    return {"llm": lora.llm_target_modules, "vision": lora.vision_target_modules, "projector": None}


def always_trained(model: nn.Module, names: Optional[list[str]]) -> list[str]:
    """Seed 002's `lora.projector_target_modules`: modules that train fully in every mode
    (`multi_modal_projector`, `vision_embed_tokens`, ...). Each name is a module path or its
    last dotted components; a name that matches no module is an error, never ignored."""
    if not names:
        return []
    paths = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for t in names:
        hit = [n for n in paths if n == t or n.endswith("." + t)]
        if not hit:
            near = sorted({n.rsplit(".", 1)[-1] for n in paths if "proj" in n.rsplit(".", 1)[-1] or "embed" in n.rsplit(".", 1)[-1]})[:8]
            raise UserError("lora.projector_target_modules", f"{t!r} matches no module of {type(model).__name__}",
                            f"name modules that always train by path or last name (e.g. {', '.join(near) or 'see vlmtune inspect'})")
        out += [n for n in hit if not any(n.startswith(o + ".") for o in hit if o != n)]  # the outermost match
    return sorted(set(out))


@dataclass
class Trainables:
    """A plan resolved against one model's structure (names as in the plain model)."""

    plan: Plan
    """The plan as it will run: parts without a LoRA target train fully, parts the model
    does not have are frozen."""
    lora_targets: list[str] = field(default_factory=list)
    """Exact names of the linear modules wrapped with LoRA."""
    modules_to_save: list[str] = field(default_factory=list)
    """Module roots trained fully beside LoRA (peft `modules_to_save`, saved in the adapter)."""
    full_parts: list[str] = field(default_factory=list)
    never: tuple[str, ...] = ()
    """Name prefixes that never get a gradient (the family's), kept frozen."""
    loose_roots: list[str] = field(default_factory=list)
    """Bare-parameter part roots a LoRA adapter cannot carry: frozen while any part uses LoRA."""
    always: list[str] = field(default_factory=list)
    """Modules that train fully whatever the part plan (`lora.projector_target_modules`)."""

    @property
    def uses_lora(self) -> bool:
        return bool(self.lora_targets)

    def trains_fully(self, name: str, parts: PartMap) -> bool:
        """Whether plain-model parameter `name` is trained fully under this resolution."""
        if self.never and name.startswith(self.never):
            return False
        if self.uses_lora and any(name == r or name.startswith(r + ".") for r in self.loose_roots):
            return False
        if any(name.startswith(r + ".") for r in self.always):
            return True
        return parts.part_of(name) in self.full_parts


def resolve_trainables(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> Trainables:
    """Resolve `plan` against `model`'s modules; no weight is touched.

    Raises `UserError` when a part the plan trains cannot be told apart in this model, or
    when a fully trained module contains another part's LoRA targets.
    """
    plan = copy.deepcopy(plan)
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
                parts.fix or "use training_mode: both (trains the whole model), or set model_type to a supported family",
            )
    per_part = _part_targets(lora)
    for p in PART_NAMES:
        if plan[p].train == "lora" and parts.roots.get(p) and not lora_target_names(model, parts, family, p, per_part[p]):
            log.warning("%s: the %s has no linear layer for LoRA; training it fully instead", type(model).__name__, p)
            plan[p].train = "full"  # Gemma 3's projector is one bare matrix
    never = family.never_trained_in(model) if family else ()
    lora_parts = [p for p in PART_NAMES if plan[p].train == "lora"]
    full_parts = [p for p in PART_NAMES if plan[p].train == "full"]
    out = Trainables(plan=plan, full_parts=full_parts, never=tuple(never), always=always_trained(model, lora.projector_target_modules))
    if not lora_parts:
        return out
    for p in lora_parts:
        # LoRA inside a module that never gets a gradient would be dead weight (and trip DDP)
        out.lora_targets += [t for t in lora_target_names(model, parts, family, p, per_part[p]) if not (t + ".").startswith(never or ("\0",))]
    mods = dict(model.named_modules())
    roots = [root for p in full_parts for root in parts.roots[p]]
    roots += [r for r in out.always if not any(r == x or r.startswith(x + ".") for x in roots)]
    # peft refuses to wrap a ModuleList/ModuleDict (Qwen3-VL's deepstack_merger_list): save its
    # children instead, whatever their number.
    roots = [c for root in roots
             for c in ([f"{root}.{k}" for k in mods[root]._modules] if isinstance(mods.get(root), (nn.ModuleList, nn.ModuleDict)) else [root])]
    # A part root that is a bare parameter (BLIP-2's query_tokens) is no module: peft can
    # neither wrap it nor save it in the adapter, so it stays frozen while any part uses LoRA.
    out.loose_roots = [r for r in roots if r not in mods]
    out.modules_to_save = [r for r in roots if r in mods]
    for root in out.modules_to_save:
        inner = [t for t in out.lora_targets if t.startswith(root + ".")]
        if inner:
            raise UserError("training.parts", f"{root} trains fully but contains LoRA targets of another part ({inner[0]})", "train the enclosing part with lora too, or freeze the inner part")
    return out


def estimate_trainable(model: nn.Module, parts: PartMap, family: Optional[Family], plan: Plan, lora: LoraConfig) -> dict[str, int]:
    """Trainable parameters per part if `plan` were applied to `model` (without applying it):
    fully trained parameters count whole, each LoRA target r*(in+out)."""
    res = resolve_trainables(model, parts, family, plan, lora)
    out = {p: 0 for p in PART_NAMES}
    for n, x in model.named_parameters():
        if res.trains_fully(n, parts):
            out[parts.part_of(n)] += x.numel()
    modules = dict(model.named_modules())
    for n in res.lora_targets:
        m = modules[n]
        out[parts.part_of(n)] += (lora.r or 16) * (m.in_features + m.out_features)
    return out


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
        part = parts.part_of(strip_wrappers(name))
        extra = ".lora_" in name or ".modules_to_save." in name
        n = _numel(p)
        if not extra:
            by_part[part]["total"] += n
        if p.requires_grad:
            by_part[part]["trainable"] += n
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


def _numel(p: Any) -> int:
    """Elements of a parameter as the model defines it: a bitsandbytes 4-bit parameter packs
    two values per byte (its `quant_state.shape` is the logical shape)."""
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'part':<10} {'total':>14} {'trainable':>14}"]
    for part, v in report["parts"].items():
        lines.append(f"{part:<10} {v['total']:>14,} {v['trainable']:>14,}")
    lines.append(f"{'all':<10} {report['total_parameters']:>14,} {report['trainable_parameters']:>14,}  ({report['trainable_percent']:.2f}% trainable)")
    return "\n".join(lines)

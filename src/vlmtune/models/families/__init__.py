"""One spec per model family: where its parts live, its default LoRA targets, its
end-of-turn token and its processor quirks. Nothing else in vlmtune hard-codes module names.

Each family lives in its own module of this package (`qwen.py`, `llava.py`, ...) with its
`tiny:<family>` builder next to its spec; importing the package registers them all.

A VLM is vision encoder -> projector -> LLM (seed 002). Each family names the modules that
make up each part as paths from the top-level transformers model (transformers 5 layout). A
parameter belongs to the part whose path is its *longest* matching prefix, so a projector
nested inside the vision module (Qwen-VL's `visual.merger`) is still the projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from ...errors import UserError

PART_NAMES = ("vision", "projector", "llm")

# Seed 002's LLM targets; scoped to the LLM part so they never wrap vision MLPs.
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    """`config.model_type` values of the checkpoints this family covers."""
    aliases: tuple[str, ...]
    """`model_type` spellings users write in configs (seed 003: qwen_vl, llava, blip-2, ...)."""
    parts: Mapping[str, tuple[str, ...]]
    """part -> module paths from the top-level model."""
    lora_targets: Mapping[str, Optional[tuple[str, ...]]]
    """part -> default LoRA leaf names; None = every nn.Linear inside the part."""
    end_of_turn: str
    """Token that closes an assistant turn; supervised after every response."""
    processor_class: Optional[Callable[[], type]] = None
    """Real processor class; built image-only when it needs a video processor."""
    needs_video_processor: bool = False
    """True when the transformers processor refuses to build without torchvision."""
    dynamic_resolution: bool = False
    """Qwen-style min_pixels/max_pixels bounds apply."""
    never_trained: tuple[str, ...] = field(default_factory=tuple)
    """Parameter-name prefixes that never get a gradient (DDP needs them frozen)."""
    unused_by_config: Optional[Callable[[nn.Module], tuple[str, ...]]] = None
    """model -> more such prefixes that depend on its config (e.g. vision layers after the
    one whose features the projector reads)."""
    image_markup: Optional[str] = None
    """Text that places one image in a plain prompt (`--prompt-template`, no chat template);
    None = the processor's `image_token`."""
    build_tiny: Optional[Callable[[], tuple]] = None
    """() -> (random-init model, processor) for `tiny:<name>` (see models/tiny.py)."""
    chat_template: Optional[str] = None
    """Jinja template used when the checkpoint's processor has none (plain prompt formats
    such as BLIP-2's "Question: ... Answer:"), rendered like any chat template."""
    nested_images: bool = False
    """The processor takes a batch's images as one list per text (Gemma3, SmolVLM read a
    flat list as all images of a single text)."""
    image_token: Optional[str] = None
    """Token the processor expands into the image's embeddings, where the processor's own
    `image_token` is only a marker the user writes (Gemma3's `<start_of_image>`); None = the
    processor's. Used to count and display image tokens."""
    process: Optional[Callable[..., Any]] = None
    """(processor, kwargs, spans) -> the processor's output for `processor(**kwargs)`, for
    processors that change the text they are given without reporting it in their offsets
    (BLIP-2 prepends query tokens, PaliGemma inserts BOS and "\\n") or whose model needs more
    than they return (PaliGemma's prefix/suffix token_type_ids). `spans`: each text's
    supervised character spans (None for generation prompts). Offsets must stay relative to
    the given text, as transformers reports them."""
    packing: Optional[str] = None
    """How packed samples are kept apart (`training.packing`, data/packing.py; the attention
    backends each kind works with: `PACKING_BACKENDS`): "position_ids" (all bins of a batch in
    one row [1, T]; positions restart at each sample and transformers' attention, flash
    attention's varlen kernels included, separates the samples from them) or "mask" (one row
    per bin [bins, L], kept apart by an explicit [bins, 1, L, L] mask assembled from
    `packed_mask`; sdpa/eager only). None: the family cannot pack and trains padded."""
    packed_inputs: Optional[Callable[["PackingContext", list[dict[str, Any]], list[int]], dict[str, Any]]] = None
    """("position_ids" packing) (context, each sample's features, their lengths) -> model
    inputs of the packed row [1, T] that override the generic ones (per-sample positions
    from 0): Qwen's per-sample M-RoPE positions, PaliGemma's 1-indexed positions."""
    packed_mask: Optional[Callable[["PackingContext", dict[str, Any]], Any]] = None
    """("mask" packing, required there) (context, one sample's features) -> the attention of
    that sample as if it were alone: bool [n, n], True = may attend, or a dict of them by
    layer type (Gemma3's {full_attention, sliding_attention}). Packing places each sample's
    mask on the diagonal of its row's mask and converts the result to the backend's form
    (`attention_mask_for`); return the same tensor object for two layer types when they are
    equal, and they share one assembled mask."""
    cannot_pack: Optional[Callable[[nn.Module], Optional[str]]] = None
    """model -> why this model of the family cannot pack (e.g. BLIP-2 with a T5 LLM), None if
    it can."""

    def never_trained_in(self, model: nn.Module) -> tuple[str, ...]:
        """Every parameter-name prefix of `model` that can never receive a gradient."""
        return tuple(self.never_trained) + (tuple(self.unused_by_config(model)) if self.unused_by_config else ())

    def image_processor_kwargs(self, min_pixels: Optional[int], max_pixels: Optional[int]) -> dict:
        """Keyword arguments for the image processor (bounded resolution by default)."""
        if not self.dynamic_resolution:
            return {}
        lo = min_pixels or 224 * 224
        hi = max_pixels or max(lo, 224 * 224)
        if lo > hi:
            raise UserError("models[].min_pixels", f"min_pixels {lo} > max_pixels {hi}", "make min_pixels <= max_pixels")
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}


PACKING_BACKENDS: dict[str, tuple[str, ...]] = {
    "position_ids": ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    "mask": ("sdpa", "eager"),
}
"""`Family.packing` -> the attention implementations that keep its packed samples apart
(flash attention's varlen kernels read sample boundaries from restarting positions and take
no explicit mask)."""


@dataclass(frozen=True)
class PackingContext:
    """What the packing hooks (`Family.packed_inputs`, `packed_mask`) may read of a model,
    without the model: a collator holding this pickles small (DataLoader workers under the
    spawn start method) and carries no weights. Build it with `PackingContext.of(model)`."""

    config: Any
    """The model's transformers config (the same object: later changes to it are seen)."""
    attn_implementation: Optional[str]
    """The language model's attention implementation (sdpa, eager, flash_attention_2 ...)."""
    dtype: torch.dtype
    """The model's floating-point dtype (eager's additive masks are made in it)."""
    base_model_class: type
    """Class of the model's base (`model.base_model`; Qwen*VLModel for Qwen-VL): hooks call
    its config-only methods, such as Qwen's `get_rope_index`, on `config`."""

    @classmethod
    def of(cls, model: nn.Module) -> "PackingContext":
        """The context of `model` (a transformers model, or a peft model around one)."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = inner.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        impl = getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)
        dtype = getattr(inner, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
        return cls(config=cfg, attn_implementation=impl, dtype=dtype, base_model_class=type(getattr(inner, "base_model", inner)))

    @property
    def pad_token_id(self) -> int:
        """The language model's padding token (0 when the config names none): what ends the
        shorter rows of a "mask" packed batch. Masked and unsupervised, so any token that is
        not an image placeholder would do."""
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        pad = getattr(text, "pad_token_id", None)
        pad = getattr(self.config, "pad_token_id", None) if pad is None else pad
        return int(pad) if pad is not None else 0


def attention_mask_for(context: PackingContext, allowed: torch.Tensor) -> torch.Tensor:
    """A ready 4-D attention mask from `allowed` (bool, True = may attend) in the form the
    model's attention backend takes as is: `allowed` itself for sdpa; additive (0 / dtype min,
    in the model's dtype) for eager, which adds the mask to the attention scores."""
    if context.attn_implementation != "eager":
        return allowed
    # in place: one float tensor of the mask's size, not two
    return torch.zeros(allowed.shape, dtype=context.dtype).masked_fill_(~allowed, torch.finfo(context.dtype).min)


FAMILIES: dict[str, Family] = {}


def register(f: Family) -> Family:
    FAMILIES[f.name] = f
    return f


def family_names() -> list[str]:
    return sorted(FAMILIES)


def find_family(model_type: Optional[str], hf_model_type: Optional[str], where: str = "model_type") -> Optional[Family]:
    """The family for a checkpoint.

    The checkpoint's own `config.model_type` decides; the user's `model_type` (a seed
    alias like `qwen_vl`) must agree with it. Returns None for the generic path.
    """
    by_hf = next((f for f in FAMILIES.values() if hf_model_type in f.hf_model_types), None)
    if model_type is None:
        return by_hf
    key = model_type.lower()
    # An alias may cover several families (seed 003's `qwen_vl` = Qwen2-VL and Qwen2.5-VL).
    named = [f for f in FAMILIES.values() if key == f.name or key in f.aliases or key in f.hf_model_types]
    if not named and key not in ("generic", "auto"):
        raise UserError(where, f"unknown model_type {model_type!r}", f"use one of {', '.join(family_names())}, 'generic', or leave it out to derive it from the model")
    if by_hf is not None:
        if named and by_hf not in named:
            raise UserError(where, f"{model_type!r} does not match the checkpoint's model_type {hf_model_type!r}", f"set model_type: {by_hf.name} or leave it out")
        return by_hf
    return named[0] if named else None


# ------------------------------------------------------------------------------------------
# Parts of a loaded model.

@dataclass
class PartMap:
    """Which part each parameter and module of a model belongs to.

    `roots` maps part -> module/parameter paths (relative to the unwrapped model).
    """

    roots: dict[str, list[str]]
    unresolved: str = ""
    """Why the parts of a model without a family could not be told apart ("" = they could);
    then every parameter counts as `llm` and only `training_mode: both` is possible."""
    found_by: str = "family"
    """`family` (the spec's paths), `inspection` (models/generic.py) or `config` (some named
    in `models[].parts`)."""
    fix: str = ""
    """How to make the parts trainable separately when they could not be told apart (the
    `models[].parts` to write, suggested from the model's modules); "" = no suggestion."""

    def part_of(self, name: str) -> str:
        best, best_len = "other", -1
        for part, paths in self.roots.items():
            for p in paths:
                if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                    best, best_len = part, len(p)
        return best

    def missing(self) -> list[str]:
        return [p for p in PART_NAMES if not self.roots.get(p)]


def resolve_parts(model: nn.Module, family: Optional[Family]) -> PartMap:
    """Find each part's modules in `model` (a plain transformers model, not peft-wrapped)."""
    if family is None:
        from ..generic import find_parts

        roots, why = find_parts(model)
        return PartMap(roots, unresolved=why, found_by="inspection")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    roots: dict[str, list[str]] = {}
    for part, paths in family.parts.items():
        for p in paths:
            if p not in modules and p not in params:
                raise RuntimeError(
                    f"family {family.name}: part {part!r} expects module {p!r}, which this {type(model).__name__} does not have "
                    "(transformers layout changed?); please report it"
                )
        roots[part] = list(paths)
    return PartMap(roots)


def _register_all() -> None:
    """Import every module of this package: each registers its families."""
    import importlib
    import pkgutil

    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{m.name}")


_register_all()  # kept last: the family modules import this module

"""Padding-free packing (`training.packing`): several training samples in one row, no
padding, each sample attending only to itself.

- Bins: a seeded best-fit-decreasing packing of the samples' token counts (image tokens
  included: `SFTDataset.lengths` are of the expanded input ids) into bins of at most
  `data.max_length` tokens. The bins are a pure function of (lengths, max_length, seed), so
  a resumed run rebuilds the same bins; the Trainer's seeded sampler orders them and its
  resume skips the bins already trained, so crash-safe resume still ends where an
  uninterrupted run ends. The same bins serve every epoch (the sampler reshuffles them).
- `PackedDataset`: item i is bin i (its samples' features, encoded on access as
  `SFTDataset` does).
- `PackedCollator`: every bin of a batch concatenated into ONE row [1, sum T]:
  token keys concatenated; each sample's first label -100 (the previous sample's last
  token must not learn to predict it); image tensors concatenated in sample order, as the
  padded `Collator` does; positions restarting at 0 for every sample; `use_cache=False`
  (with a cache transformers stops looking for packed samples, and they would attend to
  each other). What depends on the model comes from the family (`Family.packed_inputs`):
  Qwen's per-sample M-RoPE positions, BLIP-2's and Gemma3's explicit attention masks.
  Items that are single samples (evaluation) are padded by the wrapped collator.

How a family keeps packed samples apart (`Family.packing`): "position_ids" (transformers
separates them by where positions restart: sdpa/eager through a mask it builds, flash
attention through its varlen kernels) or "mask" (the family's explicit mask: sdpa/eager).
Anything else -- no family (the generic path), a family that cannot pack, an attention
backend that cannot take the family's form -- trains padded, after one line saying why
(`packing_blocker`).
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional, Sequence

import torch

from ..models.families import Family
from .collate import IGNORE_INDEX, SFTDataset, _pad_trailing

PACKED_KEY = "packed_samples"
"""Key of a `PackedDataset` item: the list of its samples' features."""

PACKED_ATTENTION_MASK = "vlmtune_packed_attention_mask"
"""Batch key of a packed row's explicit attention mask (4-D, or Gemma3's dict of masks). The
trainer hands it to the model as `attention_mask` (train/packing.py); under its own name the
Trainer's token counting never reads it as a padding mask."""

TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")
"""Per-token keys, concatenated into the row. (`attention_mask` is dropped: a packed row has
no padding.)"""

BACKENDS = {
    "position_ids": ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    "mask": ("sdpa", "eager"),
}
"""Attention implementations that keep packed samples apart, by `Family.packing`."""


def attn_implementation(model: torch.nn.Module) -> Optional[str]:
    """The attention implementation `model`'s language model runs."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)


def packing_blocker(family: Optional[Family], model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot train packed (one line for the user), or None when it can."""
    if family is None:
        return "this model has no vlmtune family (generic path), so how to keep packed samples apart is unknown"
    if family.packing is None:
        return f"family {family.name} cannot pack"
    if family.cannot_pack is not None and (why := family.cannot_pack(model)):
        return why
    impl = attn_implementation(model)
    ok = BACKENDS.get(family.packing, ())
    if impl not in ok:
        return f"attention implementation {impl!r} cannot keep packed {family.name} samples apart (it packs with {', '.join(ok)})"
    return None


def pack_bins(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into bins of at most `max_length` tokens.

    Samples are placed longest first (equal lengths in an order drawn from `seed`), each into
    the fullest bin it still fits, else a new bin. Each bin lists its samples by index.
    Deterministic for (lengths, max_length, seed).
    """
    n = len(lengths)
    too_long = [i for i, k in enumerate(lengths) if k > max_length]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens > max_length {max_length}")
    tie = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), tie[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the fullest bin that fits is the first >= length
    for i in order:
        k = int(lengths[i])
        at = bisect.bisect_left(free, (k, -1))
        if at == len(free):
            b, room = len(bins), max_length
            bins.append([])
        else:
            room, b = free.pop(at)
        bins[b].append(i)
        if room - k > 0:
            bisect.insort(free, (room - k, b))
    return [sorted(b) for b in bins]


class PackedDataset(torch.utils.data.Dataset):
    """Bins of an `SFTDataset`'s samples; item i = {PACKED_KEY: [features of bin i's samples]}."""

    def __init__(self, dataset: SFTDataset, max_length: int, seed: int):
        self.dataset = dataset
        self.max_length = max_length
        self.bins = pack_bins(dataset.lengths, max_length, seed)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {PACKED_KEY: [self.dataset[j] for j in self.bins[i]]}

    @property
    def lengths(self) -> list[int]:
        """Tokens of each bin."""
        return [sum(self.dataset.lengths[j] for j in b) for b in self.bins]

    def bin_names(self, sample_ids: Sequence[str]) -> list[str]:
        """Each bin named by its samples' ids (what the non-finite guard reports)."""
        return [", ".join(sample_ids[j] for j in b) for b in self.bins]

    def describe(self) -> str:
        fill = sum(self.lengths) / (len(self.bins) * self.max_length)
        return f"{len(self.dataset)} samples -> {len(self.bins)} rows of <= {self.max_length} tokens ({fill:.0%} filled)"


def pack_features(features: list[dict[str, Any]], family: Family, model: torch.nn.Module) -> dict[str, Any]:
    """One padding-free row [1, sum T] from single samples' features (see the module docstring)."""
    lengths = [int(f["input_ids"].shape[-1]) for f in features]
    batch: dict[str, Any] = {}
    for key in dict.fromkeys(k for f in features for k in f):
        if key == "attention_mask":
            continue
        vals = [f[key] for f in features if key in f]
        if key in TOKEN_KEYS:
            if len(vals) != len(features):
                raise ValueError(f"packing: {key!r} is missing from some samples")
            batch[key] = torch.cat([torch.as_tensor(v).reshape(-1) for v in vals])[None]
        else:
            tensors = [torch.as_tensor(v) for v in vals]
            if len({t.shape[1:] for t in tensors}) > 1 and len({t.dim() for t in tensors}) == 1 and tensors[0].dim() >= 3:
                tensors = _pad_trailing(tensors)  # Idefics3/SmolVLM tiles, as the padded Collator does
            batch[key] = torch.cat(tensors, dim=0)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    batch["labels"][0, starts] = IGNORE_INDEX  # a fresh tensor (torch.cat): the samples' own labels are untouched
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    if family.packed_inputs is not None:
        extra = dict(family.packed_inputs(model, features, lengths))
        if "attention_mask" in extra:
            batch[PACKED_ATTENTION_MASK] = extra.pop("attention_mask")
        batch.update(extra)
    if family.packing == "mask" and PACKED_ATTENTION_MASK not in batch:
        raise RuntimeError(f"family {family.name} packs with an explicit mask but its packed_inputs gave none; please report it")
    batch["use_cache"] = False
    return batch


class PackedCollator:
    """Collates `PackedDataset` items into one padding-free row (`pack_features`); anything
    else (evaluation's single samples) goes to `padded`.

    `model`: the (unwrapped) transformers model, for the family's model-dependent inputs
    (Qwen's `get_rope_index` reads only its config; the masks read the attention backend).

    An explicit mask comes under `PACKED_ATTENTION_MASK`: the trainer must hand it to the
    model as `attention_mask` (`train.packing.PackedBatchMixin`, part of `VlmTrainer`);
    models take unknown keywords silently, so a trainer without it would run unmasked.
    """

    def __init__(self, family: Family, model: torch.nn.Module, padded: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.family = family
        self.model = model
        self.padded = padded

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items or not all(PACKED_KEY in it for it in items):
            return self.padded(items)
        return pack_features([f for it in items for f in it[PACKED_KEY]], self.family, self.model)

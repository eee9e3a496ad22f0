"""Padding-free packing (`training.packing`): several training samples per row, each
attending only to itself.

- Bins: a seeded best-fit-decreasing packing of the samples' token counts (image tokens
  included: `SFTDataset.lengths` are of the expanded input ids) into bins of at most
  `data.max_length` tokens. The bins are a pure function of (lengths, max_length, seed), so
  a resumed run rebuilds the same bins; the Trainer's seeded sampler orders them and its
  resume skips the bins already trained, so crash-safe resume still ends where an
  uninterrupted run ends. The same bins serve every epoch (the sampler reshuffles them).
- `PackedDataset`: item i is bin i (its samples' features, encoded on access as
  `SFTDataset` does).
- `PackedCollator` (`pack_batch`): a batch of bins becomes rows in the layout the family's
  `Family.packing` kind keeps samples apart with:
  - "position_ids": every bin of the batch concatenated into ONE row [1, sum T], with no
    padding and no attention mask: transformers separates the samples by where their
    positions restart (sdpa/eager through a mask it builds, flash attention through its
    varlen kernels, which need the one row). Model inputs that depend on the model come from
    `Family.packed_inputs` (Qwen's per-sample M-RoPE positions, PaliGemma's 1-indexed ones).
  - "mask": ONE ROW PER BIN [bins, L], L = the longest bin of the batch; a shorter bin ends
    in padding (pad token, label -100, position 0). The explicit mask [bins, 1, L, L] holds
    each sample's own attention (`Family.packed_mask`) on its row's diagonal and nothing
    across samples: mask memory and attention work grow with bins x L^2, not with
    (bins x L)^2 as one concatenated row's would. A padding token attends only to itself (a
    query that may attend to nothing makes sdpa's softmax NaN); no real token attends to it.
    The batch also carries the [bins, L] padding mask as `attention_mask`, so the Trainer's
    token count and the step metrics (train/throughput.py) count the padding as padding.
  In both: each sample's first label -100 (the previous sample's last token must not learn
  to predict it); image tensors concatenated in sample order, as the padded `Collator`
  does; positions restarting at 0 for every sample; `use_cache=False` (with a cache
  transformers stops looking for packed samples, and they would attend to each other).
  Items that are single samples (evaluation) are padded by the wrapped collator.

How a family keeps packed samples apart (`Family.packing`) and with which attention
backends (`PACKING_BACKENDS`): anything else -- no family (the generic path), a family that
cannot pack, an attention backend that cannot take the family's form -- trains padded, after
one line saying why (`packing_blocker`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..models.families import PACKING_BACKENDS, Family, PackingContext, attention_mask_for
from .collate import IGNORE_INDEX, SFTDataset, cat_image_tensors

PACKED_KEY = "packed_samples"
"""Key of a `PackedDataset` item: the list of its samples' features."""

PACKED_ATTENTION_MASK = "vlmtune_packed_attention_mask"
"""Batch key of packed rows' explicit attention mask ([bins, 1, L, L], or Gemma3's dict of
them). The trainer hands it to the model as `attention_mask` (train/packing.py); under its own
name the Trainer's token counting never reads it as a padding mask."""

TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")
"""Per-token keys, laid out in rows. (The samples' own `attention_mask` is dropped: rows are
padded, if at all, by packing itself.)"""


def packing_blocker(family: Optional[Family], model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot train packed (one line for the user), or None when it can."""
    if family is None:
        return "this model has no vlmtune family (generic path), so how to keep packed samples apart is unknown"
    if family.packing is None:
        return f"family {family.name} cannot pack"
    if family.cannot_pack is not None and (why := family.cannot_pack(model)):
        return why
    impl = PackingContext.of(model).attn_implementation
    ok = PACKING_BACKENDS.get(family.packing, ())
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


PackingSource = Union[PackingContext, torch.nn.Module]
"""What packing reads of the model: its `PackingContext`, or the model to take it from."""


def pack_features(features: list[dict[str, Any]], family: Family, source: PackingSource) -> dict[str, Any]:
    """One bin's samples packed into a single row [1, T], T = their total tokens (see
    `pack_batch`)."""
    return pack_batch([features], family, source)


def pack_batch(bins: list[list[dict[str, Any]]], family: Family, source: PackingSource) -> dict[str, Any]:
    """A batch of bins (each a list of single samples' features) as model inputs, in the
    family's layout (see the module docstring): "position_ids" -> one row, token keys
    [1, sum T]; "mask" -> one row per bin, token keys [bins, L] with L = the longest bin,
    `attention_mask` [bins, L] (1 = token, 0 = padding) and `PACKED_ATTENTION_MASK`
    [bins, 1, L, L] (or a dict of them). Image tensors: every sample's, in sample order."""
    context = source if isinstance(source, PackingContext) else PackingContext.of(source)
    if family.packing == "mask":
        if family.packed_mask is None or family.packed_inputs is not None:
            raise RuntimeError(f"family {family.name} packs with an explicit mask, which needs packed_mask and no packed_inputs; please report it")
        rows = bins
    else:
        rows = [[f for b in bins for f in b]]
    lengths = [[int(f["input_ids"].shape[-1]) for f in row] for row in rows]
    totals = [sum(ls) for ls in lengths]
    width = max(totals)
    features = [f for row in rows for f in row]
    batch: dict[str, Any] = {}
    for key in dict.fromkeys(k for f in features for k in f):
        if key == "attention_mask":
            continue
        if key in TOKEN_KEYS:
            batch[key] = _token_rows(key, rows, width, context.pad_token_id)
        else:
            batch[key] = cat_image_tensors([f[key] for f in features if key in f])
    batch["position_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ls in enumerate(lengths):
        starts = torch.tensor([0, *ls[:-1]]).cumsum(0)
        batch["labels"][r, starts] = IGNORE_INDEX  # a fresh tensor (_token_rows): the samples' own labels are untouched
        batch["position_ids"][r, :totals[r]] = torch.cat([torch.arange(n) for n in ls])
    if family.packing == "mask":
        batch["attention_mask"] = (torch.arange(width)[None] < torch.tensor(totals)[:, None]).long()
        batch[PACKED_ATTENTION_MASK] = _row_masks(family, context, rows, lengths, width)
    elif family.packed_inputs is not None:
        batch.update(family.packed_inputs(context, features, lengths[0]))
    batch["use_cache"] = False
    return batch


def _token_rows(key: str, rows: list[list[dict[str, Any]]], width: int, pad_token_id: int) -> torch.Tensor:
    """[rows, width]: each row's samples' `key` concatenated, then padding (the pad token for
    input ids, -100 for labels, 0 = text for token types)."""
    vals = [[torch.as_tensor(f[key]).reshape(-1) for f in row if key in f] for row in rows]
    if any(len(v) != len(row) for v, row in zip(vals, rows)):
        raise ValueError(f"packing: {key!r} is missing from some samples")
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
    out = torch.full((len(rows), width), fill, dtype=vals[0][0].dtype)
    for r, v in enumerate(vals):
        row = torch.cat(v)
        out[r, :row.numel()] = row
    return out


def _row_masks(family: Family, context: PackingContext, rows: list[list[dict[str, Any]]], lengths: list[list[int]], width: int) -> Any:
    """The explicit mask of "mask" rows in the backend's form: [rows, 1, width, width], or a
    dict of them by layer type when the family's `packed_mask` gives one. Layer types whose
    samples' masks are the same tensors share one assembled mask (Gemma3's sliding layers
    when the window covers every sample)."""
    assert family.packed_mask is not None
    own = [family.packed_mask(context, f) for row in rows for f in row]
    named = isinstance(own[0], Mapping)
    out: dict[Any, torch.Tensor] = {}
    assembled: dict[tuple[int, ...], torch.Tensor] = {}
    for name in (list(own[0]) if named else [None]):
        blocks = [m[name] for m in own] if named else own
        same = tuple(id(b) for b in blocks)  # `own` holds them all, so the ids stay theirs
        if same not in assembled:
            assembled[same] = attention_mask_for(context, block_diagonal(blocks, lengths, width))
        out[name] = assembled[same]
    return out if named else out[None]


def block_diagonal(blocks: Sequence[torch.Tensor], lengths: list[list[int]], width: int) -> torch.Tensor:
    """bool [rows, 1, width, width] (True = may attend): row r holds its samples' own masks
    (`blocks`, bool [n, n] each, in sample order) on its diagonal and nothing across them; a
    padding position after the row's samples sees only itself (a query row with nothing to
    attend to makes sdpa's softmax NaN, which would reach the gradients)."""
    out = torch.zeros(len(lengths), 1, width, width, dtype=torch.bool)
    k = 0
    for r, ls in enumerate(lengths):
        s = 0
        for n in ls:
            if tuple(blocks[k].shape) != (n, n):
                raise RuntimeError(f"a packed sample's mask is {tuple(blocks[k].shape)}, expected ({n}, {n}); please report it")
            out[r, 0, s:s + n, s:s + n] = blocks[k]
            s, k = s + n, k + 1
        pad = torch.arange(s, width)
        out[r, 0, pad, pad] = True
    return out


class PackedCollator:
    """Collates `PackedDataset` items into packed rows (`pack_batch`); anything else
    (evaluation's single samples) goes to `padded`.

    Holds the model's `PackingContext` (its config, attention backend and dtype), not the
    model: picklable and small, so DataLoader workers started with spawn get no weights.
    `source`: that context, or the (unwrapped or peft) model to take it from.

    An explicit mask comes under `PACKED_ATTENTION_MASK`: the trainer must hand it to the
    model as `attention_mask` (`train.packing.PackedBatchMixin`, part of `VlmTrainer`);
    models take unknown keywords silently, so a trainer without it would run unmasked.
    """

    def __init__(self, family: Family, source: PackingSource, padded: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.family = family
        self.context = source if isinstance(source, PackingContext) else PackingContext.of(source)
        self.padded = padded

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items or not all(PACKED_KEY in it for it in items):
            return self.padded(items)
        return pack_batch([it[PACKED_KEY] for it in items], self.family, self.context)

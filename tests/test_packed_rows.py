"""Packed batches of several bins (`training.packing`, data/packing.py):

- explicit-mask families (BLIP-2, Gemma3) get one row per bin [bins, L] and a
  [bins, 1, L, L] mask (bool for sdpa), never one [1, sum T] row with a (sum T)^2 mask; the
  padding at the end of shorter rows is label -100, masked, and counted as padding by the
  step metrics; loss and gradients equal the padded batch's (sdpa, eager, a sliding window
  shorter than a sample);
- position-id families keep one concatenated row;
- the collator pickles without the model (DataLoader workers under spawn) and collates the
  same batch after a round trip;
- `PackedBatchMixin` hands the model the explicit mask only at `compute_loss`, so
  `training_step` (the step metrics, the Trainer's token count) sees the padding mask.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from test_packing import REL, _features, _load, _loss_and_grads
from vlmtune.data.collate import IGNORE_INDEX, Collator
from vlmtune.data.packing import PACKED_ATTENTION_MASK, PACKED_KEY, PackedCollator
from vlmtune.train.packing import PackedBatchMixin
from vlmtune.train.throughput import count_batch


def _two_bins(feats: list[dict]) -> list[dict]:
    """Items of two bins: samples 0 and 1 together, sample 2 alone."""
    return [{PACKED_KEY: feats[:2]}, {PACKED_KEY: feats[2:]}]


def _masks(batch: dict) -> dict:
    m = batch[PACKED_ATTENTION_MASK]
    return m if isinstance(m, dict) else {"mask": m}


@pytest.mark.parametrize("fam", ["blip2", "gemma3"])
def test_explicit_mask_batches_are_one_row_per_bin(fam, shapes_dir):
    lm = _load(fam)
    feats = _features(lm, shapes_dir)
    lens = [f["input_ids"].shape[-1] for f in feats]
    rows = [lens[0] + lens[1], lens[2]]
    L = max(rows)
    assert rows[0] != rows[1]  # one row ends in padding
    batch = PackedCollator(lm.family, lm.model, padded=None)(_two_bins(feats))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, L)
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (L - n) for n in rows]
    assert torch.equal(batch["input_ids"][0, :rows[0]], torch.cat([f["input_ids"] for f in feats[:2]]))
    assert torch.equal(batch["input_ids"][1, :rows[1]], feats[2]["input_ids"])
    short = rows.index(min(rows))
    assert (batch["labels"][short, min(rows):] == IGNORE_INDEX).all()
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all() and batch["labels"][0, lens[0]] == IGNORE_INDEX
    assert batch["position_ids"][0, :rows[0]].tolist() == list(range(lens[0])) + list(range(lens[1]))
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in feats]))  # images in sample order
    masks = _masks(batch)
    if fam == "gemma3":
        assert set(masks) == {"full_attention", "sliding_attention"}
        assert masks["full_attention"] is masks["sliding_attention"]  # window 512 > every sample: one mask, shared
    for m in masks.values():
        assert m.shape == (2, 1, L, L) and m.dtype == torch.bool
        assert not m[0, 0, lens[0]:rows[0], :lens[0]].any()  # the second sample never sees the first
        assert m[0, 0, lens[0], lens[0]] and m[0, 0, lens[0] + 3, lens[0] + 1]  # but sees itself, causally
        pad = torch.arange(min(rows), L)
        assert not m[short, 0, :min(rows)][:, pad].any()  # no token attends to padding
        assert m[short, 0, pad, pad].all() and m[short, 0, pad].sum().item() == len(pad)  # padding sees only itself
    counts = count_batch(batch, None)  # the step metrics: the new padding is padding
    assert counts["tokens"] == 2 * L and int(counts["real_tokens"]) == sum(lens)


@pytest.mark.parametrize("fam,attn,window", [("blip2", "sdpa", None), ("blip2", "eager", None), ("gemma3", "sdpa", 8), ("gemma3", "eager", 8)])
def test_rows_of_several_bins_have_the_loss_and_gradients_of_the_padded_batch(fam, attn, window, shapes_dir):
    lm = _load(fam, attn, window)
    model = lm.model
    model.eval()
    feats = _features(lm, shapes_dir)
    n = sum(int((f["labels"] != IGNORE_INDEX).sum()) for f in feats)
    padded_loss, padded = _loss_and_grads(model, Collator(lm.processor.tokenizer.pad_token_id)(feats), n)
    batch = PackedCollator(lm.family, model, padded=None)(_two_bins(feats))
    assert batch["input_ids"].shape[0] == 2
    if attn == "eager":  # additive, in the model's dtype
        assert all(m.dtype == torch.float32 for m in _masks(batch).values())
    packed_loss, packed = _loss_and_grads(model, batch, n)
    assert abs(packed_loss - padded_loss) <= REL * abs(padded_loss), (packed_loss, padded_loss)
    assert packed.keys() == padded.keys()
    top = max(g.norm().item() for g in padded.values())
    worst = {k: ((packed[k] - g).norm() / g.norm()).item() for k, g in padded.items() if g.norm() > 1e-6 * top}
    assert worst and max(worst.values()) <= REL, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_position_id_families_keep_one_concatenated_row(shapes_dir):
    lm = _load("llava")
    feats = _features(lm, shapes_dir)
    batch = PackedCollator(lm.family, lm.model, padded=None)(_two_bins(feats))
    T = sum(f["input_ids"].shape[-1] for f in feats)
    assert batch["input_ids"].shape == (1, T) and "attention_mask" not in batch and PACKED_ATTENTION_MASK not in batch


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "gemma3"])
def test_the_collator_pickles_without_the_model(fam, shapes_dir):
    """Qwen's per-sample rope index runs from the config alone; nothing holds the weights."""
    lm = _load(fam)
    feats = _features(lm, shapes_dir)
    collator = PackedCollator(lm.family, lm.model, padded=Collator(lm.processor.tokenizer.pad_token_id))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(collator).values())
    blob = pickle.dumps(collator)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert len(blob) < min(weights / 10, 100_000), (len(blob), weights)
    assert _same(pickle.loads(blob)(_two_bins(feats)), collator(_two_bins(feats)))


def _same(a, b) -> bool:
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    return torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b


def test_the_model_gets_the_explicit_mask_only_at_compute_loss():
    seen = {}

    class Base:
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen["training_step"] = inputs["attention_mask"]
            return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen["model"] = inputs["attention_mask"]
            return torch.zeros(())

    class Trainer(PackedBatchMixin, Base):
        pass

    padding, explicit = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 1, 5, 5, dtype=torch.bool)
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": padding, PACKED_ATTENTION_MASK: explicit}
    Trainer().training_step(None, inputs)
    assert seen["training_step"] is padding and seen["model"] is explicit
    assert inputs[PACKED_ATTENTION_MASK] is explicit and inputs["attention_mask"] is padding  # the caller's dict untouched

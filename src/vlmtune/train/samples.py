"""Training batches that can name their samples (for the non-finite guard's messages)."""

from __future__ import annotations

from typing import Any, Callable

import torch

SAMPLE_INDEX_KEY = "vlmtune_sample_index"
"""Batch key carrying the dataset indices of a training batch's samples (removed before the
model sees the batch)."""


SAMPLE_ID_COLUMN = "sample_id"
"""Column of row-list datasets (TRL's GRPO) that names each row's sample (`Sample.id`)."""


class IndexedDataset(torch.utils.data.Dataset):
    """`dataset[i]` plus its own index `i`.

    The index travels with the features through the sampler, DataLoader workers, the
    Trainer's resume skipping and its gradient-accumulation prefetch, so a batch can always
    name its samples without knowing how any of those ordered them.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], SAMPLE_INDEX_KEY: i}


class IndexCarryingCollator:
    """Wraps a collator: strips `SAMPLE_INDEX_KEY` from the features, collates the rest, and
    puts the indices back as one LongTensor [batch]. Batches without indices (evaluation)
    pass through unchanged."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features or not all(SAMPLE_INDEX_KEY in f for f in features):
            return self.collate(features)
        index = [int(f[SAMPLE_INDEX_KEY]) for f in features]
        batch = self.collate([{k: v for k, v in f.items() if k != SAMPLE_INDEX_KEY} for f in features])
        batch[SAMPLE_INDEX_KEY] = torch.tensor(index, dtype=torch.long)
        return batch

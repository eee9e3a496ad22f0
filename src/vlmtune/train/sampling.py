"""Length-grouped batches for the padded path (`training.group_by_length`).

transformers' own `group_by_length` sampler needs every sample's length; for a dataset that is
not a `datasets.Dataset` it gets them by loading every item, which for a VLM means decoding
every image once more before the first step. vlmtune already knows the lengths (the encoder's
pre-pass, image tokens included), so the mixin hands them over. The order is a pure function of
(seed, epoch): a resumed run re-draws the same order and the Trainer skips the batches already
trained, so crash-safe resume still ends where an uninterrupted run ends.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class SeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Indices in groups of `group_size` of similar length (transformers' mega-batch scheme),
    shuffled by a generator seeded with `seed + epoch`."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


class LengthGroupedMixin:
    """Mixin for a `transformers.Trainer` subclass. Constructor keyword `sample_lengths`: the
    training samples' token counts (index-aligned with the dataset); given, batches group by
    length; None keeps the Trainer's sampler."""

    def __init__(self, *args: Any, sample_lengths: Optional[Sequence[int]] = None, **kwargs: Any):
        self._sample_lengths = sample_lengths
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self._sample_lengths is None:
            return super()._get_train_sampler(train_dataset)
        # groups span a whole optimizer step, as transformers' sampler does
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(self._sample_lengths, group, seed)

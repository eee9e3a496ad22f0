"""Padding-free packing in a training run (`training.packing`; the packing itself is
data/packing.py).

- `training_data`: the Trainer's train dataset, collator and sample names, packed when the
  model can pack and padded (after one line saying why) when it cannot. Evaluation always
  pads (the collator pads whatever is not a packed bin).
- `PackedBatchMixin`: packed rows' explicit attention mask (BLIP-2's 4-D mask, Gemma3's
  dict of masks) travels under its own key and becomes the model's `attention_mask` only
  here, at the model call (`compute_loss`), after the Trainer and the step metrics have
  seen the batch: both count the tokens a batch holds from `attention_mask`
  (`include_num_input_tokens_seen`, `throughput.count_batch`), which must stay the rows'
  [bins, L] padding mask for that.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from .. import dist
from ..config import Config
from ..data.collate import Collator, SFTDataset
from ..data.packing import PACKED_ATTENTION_MASK, PackedCollator, PackedDataset, packing_blocker
from ..models.loading import LoadedModel
from .samples import IndexCarryingCollator, IndexedDataset

log = logging.getLogger("vlmtune")


def training_data(cfg: Config, lm: LoadedModel, train_ds: SFTDataset, run_label: str
                  ) -> tuple[torch.utils.data.Dataset, Callable[[list[dict[str, Any]]], dict[str, Any]], list[str], Optional[PackedDataset]]:
    """(train dataset, collator, sample_ids, the packed bins or None) for the Trainer.

    Items carry their dataset index for the non-finite guard (`samples.IndexedDataset`); a
    packed item is a bin, named by all of its samples' ids.
    """
    ids = [s.id for s in train_ds.samples]
    padded = Collator(lm.processor.tokenizer.pad_token_id)
    if cfg.training.packing:
        why = packing_blocker(lm.family, lm.model)
        if why is None:
            packed = PackedDataset(train_ds, cfg.data.max_length, cfg.training.seed)
            if dist.is_main():
                log.info("%s: training.packing: %s", run_label, packed.describe())
            collator = IndexCarryingCollator(PackedCollator(lm.family, lm.model, padded))
            return IndexedDataset(packed), collator, packed.bin_names(ids), packed
        if dist.is_main():
            log.warning("%s: training.packing: %s; training padded", run_label, why)
    return IndexedDataset(train_ds), IndexCarryingCollator(padded), ids, None


class PackedBatchMixin:
    """Mixin for a `transformers.Trainer` subclass: a packed batch's explicit attention mask
    (`PACKED_ATTENTION_MASK`) becomes the model's `attention_mask` (see the module docstring).

    At `compute_loss`, not `training_step`: the mixins that count tokens in `training_step`
    (`ThroughputMixin`) must still see the [bins, L] padding mask there."""

    def compute_loss(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, dict) and PACKED_ATTENTION_MASK in inputs:
            inputs = dict(inputs)  # the Trainer's own dict keeps the padding mask
            inputs["attention_mask"] = inputs.pop(PACKED_ATTENTION_MASK)
        return super().compute_loss(model, inputs, *args, **kwargs)

"""The training loss: mean over every supervised token of an optimizer step.

transformers' Trainer gets this right only for models that take `num_items_in_batch` through
`**kwargs` into their own loss. Several VLM classes declare `accepts_loss_kwargs = False`
(Qwen2.5-VL among them), and then each micro-batch is averaged on its own and divided by
the accumulation count. Micro-batches that hold different numbers of answer tokens are then
weighted unequally, and so are the ranks of a multi-process job. `TokenMeanLossMixin` hands
the Trainer a `compute_loss_func`, its documented hook for this. The Trainer then counts the
supervised tokens of the whole step (across micro-batches and, with
`average_tokens_across_devices`, across ranks), pops the labels so the model skips its own
loss, and takes our sum / count.

(Issue #15's chunked loss, which never materialises full-vocabulary logits, belongs here.)
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def token_mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor | int] = None) -> torch.Tensor:
    """Causal-LM cross-entropy: logits [B, T, V] at position t predict labels [B, T] at t+1;
    -100 labels are ignored. Summed and divided by `num_items_in_batch` (the supervised
    tokens of the whole step) when given, else averaged over this batch's supervised tokens."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:  # not a language model: a model that returns only its own loss keeps it
        return outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


class TokenMeanLossMixin:
    """Mixin for a `transformers.Trainer` subclass: `token_mean_loss` unless the caller
    passes its own `compute_loss_func`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("compute_loss_func", token_mean_loss)
        super().__init__(*args, **kwargs)

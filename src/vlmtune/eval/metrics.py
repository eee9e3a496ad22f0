"""Generation metrics. Each takes predictions [n] and references [n][k] (k >= 1 per sample).

The Evaluation issue grows this module (BLEU-4, METEOR, ROUGE-L, CIDEr, task metrics and
bootstrap intervals); the registry below is where new metrics go.
"""

from __future__ import annotations

from typing import Callable

MetricFn = Callable[[list[str], list[list[str]]], float]


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of any(prediction.strip() == reference.strip())."""
    if not predictions:
        return 0.0
    hits = sum(any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, references))
    return hits / len(predictions)


METRICS: dict[str, MetricFn] = {"exact_match": exact_match}
DEFAULT_METRICS = ["exact_match"]


def compute(names: list[str], predictions: list[str], references: list[list[str]]) -> dict[str, dict]:
    out = {}
    for name in names:
        if name not in METRICS:
            from ..errors import UserError

            raise UserError("evaluation.metrics", f"unknown metric {name!r}", f"available: {', '.join(sorted(METRICS))}")
        out[name] = {"value": METRICS[name](predictions, references)}
    return out

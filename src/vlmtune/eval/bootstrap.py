"""Bootstrap confidence intervals over samples, for any metric written as additive statistics.

Every metric hands over per-sample statistics `stats` [n, d] and an `aggregate` that turns
*summed* statistics [B, d] (plus the sample count n) into scores [B]:

- a mean metric (exact match, ROUGE-L, CIDEr-D with document frequencies fixed): d = 1,
  aggregate = sum / n;
- a corpus metric (BLEU, METEOR, CER/WER): the library's own sufficient statistics
  (n-gram matches, lengths, edit counts), aggregate = the library's corpus formula.

A resample draws n sample indices with replacement; its summed statistics are
`counts @ stats` with counts [B, n] the multiplicity of each sample. Resamples are drawn from
one fixed seed, so every metric of one evaluation sees the *same* B resamples -- which is what
a paired comparison of two runs on the same samples needs.

Cost: B=1000 resamples of n=10,000 samples are 10M index draws, done in chunks of 100
resamples (4 MB of counts per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

Aggregate = Callable[[np.ndarray, int], np.ndarray]
"""(summed stats [B, d], n) -> scores [B]."""

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 12345


def mean_aggregate(sums: np.ndarray, n: int) -> np.ndarray:
    return sums[:, 0] / max(n, 1)


@dataclass
class Bootstrap:
    """Percentile bootstrap over samples with a fixed seed."""

    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    chunk: int = 100

    def resampled(self, stats: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """Scores of `n_resamples` resamples: [B]."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim == 1:
            stats = stats[:, None]
        n = stats.shape[0]
        if n == 0:
            return np.zeros(0)
        rng = np.random.default_rng(self.seed)
        out = []
        for start in range(0, self.n_resamples, self.chunk):
            b = min(self.chunk, self.n_resamples - start)
            idx = rng.integers(0, n, size=(b, n))
            # counts[j, i] = how often sample i is in resample j (one bincount for the chunk)
            counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
            out.append(aggregate(counts.astype(np.float64) @ stats, n))
        return np.concatenate(out)

    def ci95(self, stats: np.ndarray, aggregate: Aggregate) -> Optional[list[float]]:
        """[lo, hi]: the 2.5th and 97.5th percentiles of the resampled scores."""
        scores = self.resampled(stats, aggregate)
        if scores.size == 0:
            return None
        lo, hi = np.percentile(scores, [2.5, 97.5])
        return [float(lo), float(hi)]

    def describe(self) -> dict:
        return {"method": "percentile", "resamples": self.n_resamples, "seed": self.seed, "unit": "sample"}

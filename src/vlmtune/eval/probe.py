"""Visual reliance (seed 000's "visual-text alignment", made measurable): the policy's mean
reward on a fixed probe set, answered greedily with each sample's real images and with the
images blanked (black, same size). A policy that reads the image scores higher with it; a
gap near 0 means the answers come from the text alone.

`visual_reliance_probe` is handed to the GRPO recipe (train/ cannot import eval/), which calls
the probe every `training.eval_steps` and logs what it returns.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..data.collate import Encoder
from ..data.images import load_image
from ..data.sources import Sample
from .generate import GenerationSettings, generate


def _blanked(samples: list[Sample], folder: Path) -> list[Sample]:
    """Copies of `samples` whose images are black images of the same sizes."""
    out = []
    for i, s in enumerate(samples):
        paths = []
        for j, p in enumerate(s.images):
            size = load_image(p, s.id, s.image_policy).size
            blank = folder / f"{i}_{j}.png"
            Image.new("RGB", size, (0, 0, 0)).save(blank)
            paths.append(str(blank))
        out.append(dataclasses.replace(s, images=paths))
    return out


def visual_reliance_probe(encoder: Encoder, samples: list[Sample], rewards: list[Any], weights: list[float],
                          max_new_tokens: int) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A function of the policy model -> {"visual_reliance/reward_with_image", ".../reward_blank_image",
    ".../gap"}; `rewards` are the run's reward functions (train.rewards.RewardFunction)."""
    folder = Path(tempfile.mkdtemp(prefix="vlmtune-probe-"))
    blank = _blanked(samples, folder)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def score(model: torch.nn.Module, batch: list[Sample]) -> float:
        preds = [r["prediction"] for r in generate(model, encoder, batch, len(batch), settings)]
        refs = [s.response for s in batch]
        total = [0.0] * len(batch)
        for fn, w in zip(rewards, weights):
            for k, v in enumerate(fn.fn(preds, refs, batch)):
                total[k] += w * float(v)
        return sum(total) / max(len(total), 1)

    def probe(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        try:
            with_image, without = score(model, samples), score(model, blank)
        finally:
            model.train(was_training)
        return {"visual_reliance/reward_with_image": with_image, "visual_reliance/reward_blank_image": without,
                "visual_reliance/gap": with_image - without}

    return probe

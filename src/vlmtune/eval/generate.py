"""Batched generation: left-padded prompts, greedy by default, images processed once per sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..config import TrainingConfig
from ..data.collate import Encoder
from ..data.images import load_image
from ..data.sources import Sample
from ..io import atomic_write_json, atomic_write_text
from . import metrics as M

log = logging.getLogger("vlmtune")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None

    @classmethod
    def from_training(cls, t: TrainingConfig) -> "GenerationSettings":
        return cls(t.generation_max_new_tokens, t.generation_min_new_tokens, t.generation_num_beams, t.generation_do_sample, t.generation_temperature, t.generation_top_p)

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            if self.temperature is not None:
                kw["temperature"] = self.temperature
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        return kw


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def generate(model: torch.nn.Module, encoder: Encoder, samples: list[Sample], batch_size: int, settings: GenerationSettings) -> list[dict[str, Any]]:
    """One record per sample: id, image, query, prediction, references, token counts."""
    model.eval()
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    eos = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids(encoder.end_of_turn) if encoder.end_of_turn else None} if t is not None]
    out = []
    for batch in _batches(samples, max(1, batch_size)):
        images = [[load_image(p, f"{s.id}: image") for p in s.images] for s in batch]
        inputs = encoder.encode_prompts(batch, images).to(device)
        gen = model.generate(**inputs, **settings.kwargs(), eos_token_id=eos, pad_token_id=tok.pad_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        for s, row, mask in zip(batch, gen[:, prompt_len:], inputs["attention_mask"]):
            # Count generated tokens up to (and including) the first end token.
            ids = row.tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            pred = tok.decode(ids[:n], skip_special_tokens=True).strip()
            out.append({
                "id": s.id, "image": s.images[0] if s.images else None, "query": s.query, "prediction": pred,
                "references": [s.response], "n_prompt_tokens": int(mask.sum()), "n_generated_tokens": n,
            })
    return out


def evaluate_samples(model: torch.nn.Module, encoder: Encoder, samples: list[Sample], out_dir: Optional[Path], batch_size: int,
                     settings: GenerationSettings, metric_names: Optional[list[str]] = None) -> dict[str, Any]:
    """Generate, score, and (when `out_dir` is given) write predictions.jsonl and generation_metrics.json."""
    import json

    records = generate(model, encoder, samples, batch_size, settings)
    scores = M.compute(metric_names or M.DEFAULT_METRICS, [r["prediction"] for r in records], [r["references"] for r in records])
    result = {**scores, "n_samples": len(records), "generation": settings.kwargs()}
    if out_dir is not None:
        atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_json(out_dir / "generation_metrics.json", result)
    return result

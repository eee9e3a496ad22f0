"""Batched generation and evaluation: left-padded prompts, greedy by default, images processed
once per sample, predictions written as they are made so an interrupted evaluation resumes.

    build_prompt -> Encoder.encode_prompts -> model.generate -> PredictionLog -> metrics.compute

Files in the output directory:
- `predictions.jsonl`: one line per sample, in data order: id, image, query, prediction,
  references, n_prompt_tokens, n_generated_tokens. Appended (and fsynced) one batch at a
  time; on restart the complete lines whose ids match the data are kept and only the rest
  is generated.
- `predictions.meta.json`: what produced them (model, generation settings, prompt, sample
  ids). A restart with anything different moves the old predictions aside instead of
  mixing them with new ones.
- `generation_metrics.json`: every metric with its interval (written once, atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..config import TrainingConfig
from ..data.collate import Encoder
from ..data.images import load_image
from ..data.sources import Sample
from ..logs import progress
from ..errors import UserError
from ..io import atomic_write_json, read_json
from ..train.rundir import GENERATION_METRICS, PREDICTIONS
from . import metrics as M
from .bootstrap import Bootstrap

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


@dataclass
class PromptStyle:
    """How a sample becomes a prompt: the model's chat template (default), or a plain
    template such as BLIP-2's "Question: {query} Answer:" with the image(s) in front."""

    template: Optional[str] = None
    system_message: Optional[str] = None

    def __post_init__(self) -> None:
        if self.template is not None and "{query}" not in self.template:
            raise UserError("--prompt-template", f"{self.template!r} has no {{query}} placeholder", 'write e.g. "Question: {query}\\nAnswer:"')


def image_markup(encoder: Encoder) -> str:
    """Text that stands for one image in a plain prompt (the processor expands it)."""
    if encoder.family is not None and encoder.family.image_markup is not None:  # "" = the processor adds the image itself (BLIP-2)
        return encoder.family.image_markup
    token = getattr(encoder.processor, "image_token", None)
    if not token:
        raise UserError("--prompt-template", f"{type(encoder.processor).__name__} names no image token", "drop --prompt-template to use the chat template")
    return token


def build_prompt(encoder: Encoder, sample: Sample, style: PromptStyle) -> str:
    """The text the model continues: the conversation up to the final answer."""
    if style.template is not None:
        text = style.template.replace("{query}", sample.query)
        head = f"{style.system_message}\n" if style.system_message else ""
        return head + image_markup(encoder) * len(sample.images) + text
    msgs = sample.prompt_messages()
    if style.system_message and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": [{"type": "text", "text": style.system_message}]}, *msgs]
    return encoder.render_prompt(msgs)


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _end_token_ids(encoder: Encoder) -> list[int]:
    tok = encoder.tokenizer
    ids = {tok.eos_token_id}
    if encoder.end_of_turn:
        eot = tok.convert_tokens_to_ids(encoder.end_of_turn)
        if eot != tok.unk_token_id:
            ids.add(eot)
        elif len(enc := tok.encode(encoder.end_of_turn, add_special_tokens=False)) == 1:
            ids.add(enc[0])  # text that is one token but not its spelling: BLIP-2's "\n" (byte-level "Ċ")
    return sorted(i for i in ids if i is not None)


def generation_defaults(encoder: Encoder, settings: GenerationSettings) -> dict[str, Any]:
    """`settings` and the end tokens evaluation stops at, as `GenerationConfig` fields: what an
    exported model's `generation_config.json` holds, so transformers' `generate` and vLLM
    decode like `vlmtune evaluate` by default. Without sampling, the sampling knobs a base
    model's own generation config may carry (Qwen-VL's temperature, top_k, top_p) are cleared:
    greedy and beam search ignore them, and transformers refuses to save them beside
    `do_sample: false`."""
    cleared = {} if settings.do_sample else {"temperature": None, "top_p": None, "top_k": None, "min_p": None, "typical_p": None}
    return {**cleared, **settings.kwargs(), "eos_token_id": _end_token_ids(encoder), "pad_token_id": encoder.tokenizer.pad_token_id}


def new_tokens(gen: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The generated part of `generate`'s output [batch, T]: transformers' models return the
    prompt [batch, P] followed by the answer; some remote code (InternVL's `generate`, which
    generates from the prompt's embeddings) returns the answer only."""
    p = prompt_ids.shape[1]
    if gen.shape[1] >= p and torch.equal(gen[:, :p], prompt_ids.to(gen.device)):
        return gen[:, p:]
    return gen


@torch.no_grad()
def generate_batches(model: torch.nn.Module, encoder: Encoder, samples: list[Sample], batch_size: int, settings: GenerationSettings,
                     style: Optional[PromptStyle] = None) -> Iterable[list[dict[str, Any]]]:
    """Yields one list of prediction records per batch, in data order."""
    style = style or PromptStyle()
    model.eval()
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    eos = _end_token_ids(encoder)
    bar = progress(len(samples), "generate", "sample")  # evaluation is the long silent part otherwise
    for batch in _batches(samples, max(1, batch_size)):
        images = [[load_image(p, f"{s.id}: image", s.image_policy) for p in s.images] for s in batch]
        inputs = encoder.encode_prompts([build_prompt(encoder, s, style) for s in batch], images).to(device)
        gen = model.generate(**inputs, **settings.kwargs(), eos_token_id=eos, pad_token_id=tok.pad_token_id)
        records = []
        for s, row, mask in zip(batch, new_tokens(gen, inputs["input_ids"]), inputs["attention_mask"]):
            # Generated tokens up to and including the first end token (the rest is padding).
            ids = row.tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            records.append({
                "id": s.id, "image": str(s.images[0]) if s.images else None, "query": s.query,
                "prediction": tok.decode(ids[:n], skip_special_tokens=True).strip(),
                "references": s.references, "n_prompt_tokens": int(mask.sum()), "n_generated_tokens": n,
            })
        bar.update(len(batch))
        yield records
    bar.close()


def generate(model: torch.nn.Module, encoder: Encoder, samples: list[Sample], batch_size: int, settings: GenerationSettings,
             style: Optional[PromptStyle] = None) -> list[dict[str, Any]]:
    """One record per sample (see module docstring), in memory."""
    return [r for batch in generate_batches(model, encoder, samples, batch_size, settings, style) for r in batch]


class PredictionLog:
    """`predictions.jsonl` in `out_dir`, appended batch by batch and resumable."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]):
        self.path = out_dir / PREDICTIONS
        self.meta_path = out_dir / "predictions.meta.json"
        self.fingerprint = fingerprint

    def resume(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Records already written for a prefix of `samples` (the file is cut to them)."""
        if not self.path.exists():
            self._write_meta()
            return []
        meta = read_json(self.meta_path) if self.meta_path.exists() else None
        if not meta or meta.get("fingerprint") != self.fingerprint:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"predictions.{stamp}.jsonl")
            os.replace(self.path, aside)
            if self.meta_path.exists():
                os.replace(self.meta_path, aside.with_suffix(".meta.json"))
            log.warning("%s came from a different model, prompt, data or generation settings: moved to %s; generating afresh", self.path, aside.name)
            self._write_meta()
            return []
        done: list[dict[str, Any]] = []
        keep = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n") or len(done) >= len(samples):
                    break  # a line cut by a kill, or more lines than samples
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    break
                if not isinstance(rec, dict) or rec.get("id") != samples[len(done)].id:
                    break
                done.append(rec)
                keep += len(raw)
        with open(self.path, "r+b") as f:
            f.truncate(keep)
        return done

    def _write_meta(self) -> None:
        atomic_write_json(self.meta_path, {"fingerprint": self.fingerprint})

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def describe_weights(path: str | os.PathLike) -> str:
    """A model directory named with its weight files' sizes and modification times: a retrained
    run gets a different description, so its old predictions are not reused."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    return f"{p}" + "".join(f" {f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def fingerprint(model_desc: str, samples: list[Sample], settings: GenerationSettings, style: PromptStyle) -> dict[str, Any]:
    ids = hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:16]
    return {"model": model_desc, "generation": settings.kwargs(), "prompt": asdict(style), "n_samples": len(samples), "sample_ids_sha256": ids}


def score_records(records: list[dict[str, Any]], metric_names: Optional[list[str]] = None, tokenizer: Any = None) -> dict[str, Any]:
    """Metrics of prediction records (see metrics.compute) plus the sample count and bootstrap."""
    bootstrap = Bootstrap()
    scores = M.compute(metric_names or M.DEFAULT_METRICS, [r["prediction"] for r in records], [r["references"] for r in records],
                       tokenizer=tokenizer, bootstrap=bootstrap)
    return {**scores, "n_samples": len(records), "bootstrap": bootstrap.describe()}


def evaluate_samples(model: torch.nn.Module, encoder: Encoder, samples: list[Sample], out_dir: Optional[Path], batch_size: int,
                     settings: GenerationSettings, metric_names: Optional[list[str]] = None, style: Optional[PromptStyle] = None,
                     model_desc: str = "") -> dict[str, Any]:
    """Generate (resuming from `out_dir/predictions.jsonl`), score, write generation_metrics.json."""
    style = style or PromptStyle()
    names = M.check_names(metric_names or M.DEFAULT_METRICS)
    records: list[dict[str, Any]] = []
    plog = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plog = PredictionLog(out_dir, fingerprint(model_desc, samples, settings, style))
        records = plog.resume(samples)
        if records:
            log.info("%s: %d of %d samples already generated; generating the other %d", plog.path, len(records), len(samples), len(samples) - len(records))
    t0 = time.time()
    todo = samples[len(records):]
    for batch in generate_batches(model, encoder, todo, batch_size, settings, style):
        if plog is not None:
            plog.append(batch)
        records.extend(batch)
    gen_seconds = time.time() - t0
    result = score_records(records, names, encoder.tokenizer)
    result.update({
        "generation": settings.kwargs(), "prompt": asdict(style), "batch_size": batch_size,
        "generated_this_session": len(todo), "generation_seconds": gen_seconds,
    })
    if out_dir is not None:
        atomic_write_json(out_dir / GENERATION_METRICS, result)
    return result

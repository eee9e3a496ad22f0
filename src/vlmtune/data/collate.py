"""Turn a `Sample` into model inputs with labels on assistant tokens only.

How labels are found, for any chat template:
1. Render the conversation turn by turn with the model's own chat template. For assistant
   turn i, the text between `render(messages[:i], add_generation_prompt=True)` and
   `render(messages[:i+1])` holds the response; the response and the end-of-turn token that
   follows it are the supervised character span. Templates that write no end-of-turn token
   after an answer (llava-1.5's) get one inserted, or the model would never learn to stop.
2. Run the family's processor once on the whole text and images, asking for the tokenizer's
   character offsets and the processor's placeholder-replacement offsets (transformers 5),
   so character spans map exactly onto tokens of the *expanded* sequence (image tokens
   included).
3. A token is supervised iff its character span overlaps a supervised span. System, user,
   image, template and padding tokens get -100.

Shapes: `input_ids`, `labels`, `attention_mask`: [seq]; model-specific image tensors
(`pixel_values`, `image_grid_thw`, ...) as the processor returns them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import UserError
from ..models.families import Family
from .images import load_image
from .sources import Sample, message_text

log = logging.getLogger("vlmtune")

IGNORE_INDEX = -100
# Processor outputs that are bookkeeping, not model inputs.
_DROP = {"offset_mapping", "text_replacement_offsets"}


@dataclass
class Encoded:
    features: dict[str, Any]
    """Model inputs for one sample: input_ids/labels/attention_mask [seq] + image tensors."""
    n_image_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.features["input_ids"].shape[-1])

    @property
    def n_supervised(self) -> int:
        return int((self.features["labels"] != IGNORE_INDEX).sum())


class Encoder:
    """Renders, tokenizes and labels samples for one model (its processor and family)."""

    def __init__(self, processor: Any, family: Optional[Family]):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.end_of_turn = family.end_of_turn if family else (self.tokenizer.eos_token or "")
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None and getattr(processor, "image_token", None):
            # str(): Blip2Processor keeps an AddedToken here when the tokenizer names no image token
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(str(processor.image_token))
        if family is not None and family.image_token:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(family.image_token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        kw: dict[str, Any] = {}
        if getattr(self.processor, "chat_template", None) is None and self.family is not None and self.family.chat_template:
            kw["chat_template"] = self.family.chat_template  # plain prompt formats (BLIP-2, PaliGemma)
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)

    def render_with_spans(self, messages: list[dict[str, Any]], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """Full conversation text and the supervised character spans (response + end-of-turn)."""
        pieces: list[tuple[str, bool]] = []
        prev = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not prefix.startswith(prev) or not full.startswith(prefix):
                raise UserError(where, "the chat template renders earlier turns differently once later turns exist", "use a template that renders conversations incrementally")
            response = message_text(m)
            pieces.append((prefix[len(prev):], False))
            seg = full[len(prefix):]
            k = seg.find(response)
            if k < 0:
                raise UserError(where, "the chat template changes the assistant text", "check the model's chat template")
            pieces.append((seg[:k], False))
            pieces.append((response, True))
            rest = seg[k + len(response):]
            if self.end_of_turn and rest.startswith(self.end_of_turn):
                rest = rest[len(self.end_of_turn):]
            pieces.append((self.end_of_turn, True))
            pieces.append((rest, False))
            prev = full
        tail = self.render(messages)[len(prev):]
        pieces.append((tail, False))
        text, spans, pos = "", [], 0
        for piece, sup in pieces:
            if sup and piece:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        return text, _merge(spans)

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Generation prompt rendered exactly like the training text up to an answer (earlier
        answers keep the end-of-turn token `render_with_spans` inserts), plus the template's
        generation prompt."""
        history, _ = self.render_with_spans(messages)
        plain = self.render(messages)
        gen = self.render(messages, add_generation_prompt=True)
        if not gen.startswith(plain):
            return gen
        return history + gen[len(plain):]

    def _process(self, texts: list[str], images: list[Any], spans: Optional[list[list[tuple[int, int]]]] = None, **kw) -> Any:
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", **kw}
        if images:
            kwargs["images"] = images
        bos = self.tokenizer.bos_token
        if bos and texts and all(t.startswith(bos) for t in texts):
            # The chat template wrote BOS itself (Gemma, Idefics3): don't let the tokenizer add a
            # second one (transformers' apply_chat_template(tokenize=True) does the same).
            kwargs.setdefault("add_special_tokens", False)
        if self.family is not None and self.family.process is not None:
            return self.family.process(self.processor, kwargs, spans)  # BLIP-2, PaliGemma
        return self.processor(**kwargs)

    def encode(self, sample: Sample, images: Optional[list[Any]] = None) -> Encoded:
        """Input ids, labels and image tensors for one training sample."""
        if images is None:
            images = [load_image(p, f"{sample.id}: image", sample.image_policy) for p in sample.images]
        text, spans = self.render_with_spans(sample.messages, sample.id)
        out = self._process([text], images, spans=[spans], return_offsets_mapping=True, return_text_replacement_offsets=True)
        if "offset_mapping" not in out:
            raise RuntimeError(f"{type(self.processor).__name__} returned no offsets: vlmtune needs a fast tokenizer")
        offsets = out["offset_mapping"][0].tolist()
        # Shift original-text spans by the length changes of placeholder expansions before them.
        repl = (out.get("text_replacement_offsets") or [[]])[0]
        def shift(pos: int) -> int:
            return pos + sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]) for r in repl if r["span"][1] <= pos)
        exp_spans = [(shift(a), shift(a) + (b - a)) for a, b in spans]
        input_ids = out["input_ids"][0]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for t, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in exp_spans):
                labels[t] = input_ids[t]
        feats = {k: (v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v) for k, v in out.items() if k not in _DROP}
        feats["labels"] = labels
        n_img = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        return Encoded(features=feats, n_image_tokens=n_img)

    def encode_prompts(self, texts: list[str], images: list[list[Any]]) -> Any:
        """A left-padded generation batch: prompt texts (see eval.generate.build_prompt) with
        each sample's images, processed once. input_ids/attention_mask: [batch, max_prompt]."""
        flat = [im for ims in images for im in ims]
        batch_images = images if flat and self.family is not None and self.family.nested_images else flat
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            return self._process(texts, batch_images, padding=True)
        finally:
            self.tokenizer.padding_side = old

    def supervised_text(self, enc: Encoded) -> str:
        ids = enc.features["input_ids"]
        return self.tokenizer.decode(ids[enc.features["labels"] != IGNORE_INDEX].tolist(), skip_special_tokens=False)

    def supervised_segments(self, enc: Encoded) -> list[str]:
        """Each contiguous run of supervised tokens decoded: one per assistant turn (a token
        that carries the space before an answer, like BPE's " red", keeps that space)."""
        ids, labels = enc.features["input_ids"].tolist(), enc.features["labels"].tolist()
        runs: list[list[int]] = []
        prev = False
        for t, lab in zip(ids, labels):
            sup = lab != IGNORE_INDEX
            if sup and not prev:
                runs.append([])
            if sup:
                runs[-1].append(t)
            prev = sup
        return [self.tokenizer.decode(r, skip_special_tokens=False) for r in runs]

    def decode_for_display(self, ids: torch.Tensor) -> str:
        """Decoded text with runs of image tokens shown as `<image_token>xN`."""
        toks = ids.tolist()
        out, run = [], 0
        for t in toks + [None]:
            if t is not None and t == self.image_token_id:
                run += 1
                continue
            if run:
                out.append(f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)}x{run}")
                run = 0
            if t is not None:
                out.append(self.tokenizer.decode([t], skip_special_tokens=False))
        return "".join(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


class SFTDataset(torch.utils.data.Dataset):
    """Samples encoded on access (images decode lazily); overlong samples removed up front.

    The length pre-pass encodes every sample once (without keeping pixels) so the Trainer sees
    a fixed-size dataset and no sample is ever truncated through its image tokens.
    """

    def __init__(self, samples: list[Sample], encoder: Encoder, max_length: int, on_overlength: str = "skip", name: str = "train"):
        self.encoder = encoder
        kept, skipped, lengths = [], [], []
        for s in samples:
            n = encoder.encode(s).n_tokens
            if n > max_length:
                if on_overlength == "error":
                    raise UserError(f"{s.id}", f"{n} tokens (image tokens included) > data.max_length {max_length}", "raise data.max_length, shrink the image bounds, or set data.on_overlength: skip")
                skipped.append((s.id, n))
            else:
                kept.append(s)
                lengths.append(n)
        if skipped:
            log.warning("%s: skipped %d of %d samples longer than max_length=%d (e.g. %s: %d tokens); never truncated, since that would cut image tokens", name, len(skipped), len(samples), max_length, skipped[0][0], skipped[0][1])
        if not kept:
            raise UserError(f"data ({name})", f"every sample is longer than max_length={max_length}", "raise data.max_length")
        self.samples = kept
        self.skipped = skipped
        self.lengths: list[int] = lengths
        """Tokens of each kept sample, image tokens included (packing bins, length grouping)."""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encoder.encode(self.samples[i]).features


class Collator:
    """Right-pads token sequences; concatenates image tensors along their first dim.

    Per-token keys -> [batch, max_seq]; `labels` padded with -100, `attention_mask` with 0.
    """

    SEQ_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(f["input_ids"].shape[-1] for f in features)
        batch: dict[str, torch.Tensor] = {}
        pad_value = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        for key in features[0]:
            vals = [f[key] for f in features if key in f]
            if key in self.SEQ_KEYS:
                out = torch.full((len(features), n), pad_value.get(key, 0), dtype=vals[0].dtype)
                for i, v in enumerate(vals):
                    out[i, : v.shape[-1]] = v
                batch[key] = out
            else:
                batch[key] = cat_image_tensors(vals)
        return batch


def cat_image_tensors(vals: list[Any]) -> torch.Tensor:
    """Per-sample non-token tensors (`pixel_values`, `image_grid_thw`, ...) concatenated along
    their first dim in sample order: [sum of each sample's first dim, ...]. Used by the
    padded `Collator` and by packing (data/packing.py), so both hand the model the same images.

    Per-sample image axes of different sizes (Idefics3/SmolVLM pixel_values [1, tiles, 3, H, W]
    with different tile counts) are zero-padded first, as the processor does within one call
    (those models skip all-zero images)."""
    tensors = [torch.as_tensor(v) for v in vals]
    if len({t.shape[1:] for t in tensors}) > 1 and len({t.dim() for t in tensors}) == 1 and tensors[0].dim() >= 3:
        tensors = _pad_trailing(tensors)
    return torch.cat(tensors, dim=0)


def _pad_trailing(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad every dim but the first to the largest size among `tensors`."""
    size = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        padded = t.new_zeros((t.shape[0], *size))
        padded[(slice(None), *(slice(0, k) for k in t.shape[1:]))] = t
        out.append(padded)
    return out

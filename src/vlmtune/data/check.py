"""`vlmtune check` and the data gate every command passes before a model loads.

Users lose hours to a corrupt image at sample 40,000 or a missing column found after the
model loaded. Here every data file of a config is read in one pass that *collects* problems
instead of stopping at the first:

- files, in every format data/sources.py reads (CSV, JSON arrays, JSONL, Parquet, Arrow,
  `datasets`): text that is not UTF-8 (with or without a byte-order mark) or UTF-16/32 with
  one, CSV quoting that does not parse (`read_text`, `csv_rows`), JSON that is not an array
  of records, tables without the (mapped) columns;
- rows: missing/empty fields, JSON that does not parse, conversations without an assistant
  turn, placeholder/image count mismatches (data/sources.py);
- images: missing, outside their root, unsupported format, zero-size or absurd dimensions,
  decompression bombs (refused from the header, never decoded), truncated or undecodable
  files (full decode: `vlmtune check` does it, the gate before training reads headers only).

Problems print as `FILE:LINE: field: what is wrong — how to fix`. With the processor only
(no weights), `check` also counts tokens: a histogram of sample lengths with image tokens,
how many exceed `data.max_length` (and whether any image alone fills it), and the
supervised tokens.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from ..config import Config
from ..errors import UserError
from ..logs import progress
from .images import ImageBytes, ImagePolicy, ImageRef, is_remote
from .sources import Sample, load_split

log = logging.getLogger("vlmtune")

SPLITS = ("train", "val", "test")
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
# Pixel cap (decompression bombs): the sample's ImagePolicy, `data.max_image_pixels`.
# Qwen-VL's processor refuses aspect ratios above 200; nothing useful is that thin.
MAX_ASPECT = 200


@dataclass
class Problem:
    where: str
    """`file:line: field` (or just the file)."""
    what: str
    fix: str
    severity: str = "error"
    fatal: bool = False
    """A whole split is unusable (missing file or column, not UTF-8): never skippable."""

    def line(self) -> str:
        return f"{self.where}: {self.what} — {self.fix}"

    @classmethod
    def of(cls, e: UserError, severity: str = "error") -> "Problem":
        return cls(e.where, e.problem, e.fix or "", severity)


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> {"samples": n good, "bad": n skipped}."""
    lengths: dict[str, Any] = field(default_factory=dict)
    """model name -> token statistics (see `count_tokens`)."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "errors": [p.line() for p in self.errors],
            "warnings": [p.line() for p in self.warnings],
            "splits": self.counts,
            "lengths": self.lengths,
        }


def inspect_image(path: ImageRef, full_decode: bool, policy: ImagePolicy = ImagePolicy()) -> Optional[str]:
    """What is wrong with the image at `path` (a file, or `ImageBytes` held in memory; None:
    nothing). Reads the header; decodes the pixels only when `full_decode` (to catch truncated
    files). `policy` (the sample's) sets the pixel cap."""
    if is_remote(path):
        return None  # fetched (size-capped, pixel-capped) when loaded; nothing to read here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path.data) if isinstance(path, ImageBytes) else path) as im:
                w, h = im.size
                fmt = im.format
                if fmt not in SUPPORTED_FORMATS:
                    return f"unsupported image format {fmt}"
                if w == 0 or h == 0:
                    return f"zero-size image ({w}x{h})"
                over = policy.too_many_pixels(w, h)
                if over:
                    return f"{over} (a possible decompression bomb, or far more than training uses)"
                if max(w, h) / min(w, h) > MAX_ASPECT:
                    return f"absurd aspect ratio {w}x{h} (more than {MAX_ASPECT}:1)"
                if full_decode:
                    im.load()
    except FileNotFoundError:
        return "image file does not exist"
    except Image.DecompressionBombError as e:
        return f"refused as a decompression bomb ({e}; data.max_image_pixels: {policy.max_image_pixels:,})"
    except UnidentifiedImageError:
        return "not an image PIL can read (empty, corrupt or unsupported file)"
    except (OSError, SyntaxError, ValueError) as e:
        return f"image does not decode ({e})"
    return None


def _image_field(sample: Sample, k: int) -> str:
    if k < len(sample.image_fields):
        return sample.image_fields[k]  # the row's own field or column (data/sources.py)
    return "images" if len(sample.images) == 1 else f"images[{k}]"


def check_images(samples: list[Sample], full_decode: bool, image_column: str = "image") -> tuple[list[Sample], list[Problem]]:
    """(samples whose images are all fine, one problem per bad image)."""
    good, problems = [], []
    seen: dict[tuple[str, ImagePolicy], Optional[str]] = {}
    bar = progress(len(samples), "check images", "sample")
    for s in samples:
        bar.update()
        bad = False
        for k, p in enumerate(s.images):
            key = (p, s.image_policy)
            if key not in seen:
                seen[key] = inspect_image(p, full_decode, s.image_policy)
            if seen[key]:
                field_name = _image_field(s, k) if s.image_fields or not s.origin.rsplit(":", 1)[0].endswith(".csv") else image_column
                problems.append(Problem(f"{s.origin or s.id}: {field_name}", f"{seen[key]} ({p})", "replace or remove the image, or drop the row"))
                bad = True
        if not bad:
            good.append(s)
    bar.close()
    return good, problems


def load_checked_splits(cfg: Config, full_decode: bool = False) -> tuple[dict[str, Optional[list[Sample]]], Report]:
    """Every split of `cfg`, read with problems collected; images checked (headers, or fully).

    Returns the usable samples per split (bad rows/images removed) and the report. File-level
    problems (missing file, missing column, undecodable text) are errors of the whole split.
    """
    report = Report()
    splits: dict[str, Optional[list[Sample]]] = {}
    for split in SPLITS:
        row_problems: list[UserError] = []
        try:
            samples = load_split(cfg, split, row_problems)
        except UserError as e:
            report.problems.append(dataclasses.replace(Problem.of(e), fatal=True))
            splits[split] = None
            continue
        report.problems += [Problem.of(e) for e in row_problems]
        if samples is None:
            splits[split] = None
            continue
        good, img_problems = check_images(samples, full_decode, cfg.data.image_column)
        report.problems += img_problems
        splits[split] = good
        report.counts[split] = {"samples": len(good), "bad": len(row_problems) + len(samples) - len(good)}
    return splits, report


def refuse(problems: list[Problem], extra_fix: str = "") -> UserError:
    """One-line error for the first of `problems`, saying how many more there are."""
    first, more = problems[0], len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more != 1 else ''}: `vlmtune check` lists them all)" if more else ""
    return UserError(first.where, first.what + suffix, first.fix + extra_fix)


def gate(cfg: Config) -> tuple[dict[str, Optional[list[Sample]]], Report]:
    """The data check `train`/`run` pass before any model loads (image headers only).

    data.on_bad_sample: error -> refuse with the first problem and how many there are;
    skip -> drop bad samples, logging each; the counts go into the run's metrics.
    """
    splits, report = load_checked_splits(cfg, full_decode=False)
    fatal = [p for p in report.errors if p.fatal]
    if fatal:
        raise refuse(fatal + [p for p in report.errors if not p.fatal])
    if report.errors and cfg.data.on_bad_sample == "error":
        raise refuse(report.errors, "; or set data.on_bad_sample: skip to train without the bad samples")
    for p in report.errors:
        log.warning("skipping a bad sample: %s", p.line())
    if report.errors:
        log.warning("skipped %d bad samples (data.on_bad_sample: skip)", len(report.errors))
    for split, samples in splits.items():
        if samples is not None and not samples:
            if split == "train":
                raise UserError("data.train", f"no usable samples: all {report.counts['train']['bad']} were bad and skipped", "fix them (`vlmtune check CONFIG` lists them)")
            log.warning("data.%s: every sample was bad; the split is left out", split)
            splits[split] = None
    return splits, report


def count_tokens(cfg: Config, splits: dict[str, Optional[list[Sample]]], model_index: int = 0, report: Optional[Report] = None) -> dict[str, Any]:
    """Token statistics with the model's processor (no weights): per sample, the full
    tokenized length with image tokens expanded; a power-of-two histogram.

    With `report`: samples whose image tokens alone reach `data.max_length` (no room for any
    text, so they can never train) go into it as one problem -- an error under
    `data.on_overlength: error`, else a warning (they are skipped). The config check cannot
    see this: image tokens depend on the processor and each image's size."""
    from ..models.loading import load_processor_only
    from .collate import Encoder

    m = cfg.models[model_index]
    processor, family = load_processor_only(m, f"models[{model_index}]")
    enc = Encoder(processor, family)
    lengths: list[int] = []
    supervised = {s: 0 for s in SPLITS}
    image_tokens: list[int] = []
    no_room: list[Sample] = []
    problems: list[Problem] = []
    bar = progress(sum(len(splits.get(split) or []) for split in SPLITS), "count tokens", "sample")
    for split in SPLITS:
        for s in splits.get(split) or []:
            bar.update()
            try:
                e = enc.encode(s)
            except UserError as err:
                problems.append(Problem(f"{s.origin or s.id}", err.problem, err.fix or ""))
                continue
            lengths.append(e.n_tokens)
            image_tokens.append(e.n_image_tokens)
            if e.n_image_tokens >= cfg.data.max_length:
                no_room.append(s)
            supervised[split] += e.n_supervised
    bar.close()
    if no_room and report is not None:
        most = max(image_tokens)
        more = f" and {len(no_room) - 1} more sample{'s' if len(no_room) != 2 else ''}" if len(no_room) > 1 else ""
        report.problems.append(Problem(
            "data.max_length", f"{cfg.data.max_length} leaves no room for text: the image tokens alone reach it in {no_room[0].origin or no_room[0].id}{more} (up to {most} image tokens with {m.name})",
            f"raise data.max_length above {most}, or lower models[{model_index}].max_pixels for fewer image tokens",
            "error" if cfg.data.on_overlength == "error" else "warning"))
    hist: list[list[int]] = []
    if lengths:
        top = 2 ** math.ceil(math.log2(max(max(lengths), 2)))
        edge = 16
        while edge <= top:
            lo = edge // 2 if edge > 16 else 0
            hist.append([edge, sum(lo < n <= edge for n in lengths)])
            edge *= 2
    return {
        "model": m.name,
        "n_samples": len(lengths),
        "histogram": hist,
        "max": max(lengths, default=0),
        "median": statistics.median(lengths) if lengths else 0,
        "mean_image_tokens": statistics.fmean(image_tokens) if image_tokens else 0,
        "over_max_length": sum(n > cfg.data.max_length for n in lengths),
        "max_length": cfg.data.max_length,
        "supervised_tokens": supervised,
        "problems": [p.line() for p in problems],
    }


def format_report(report: Report) -> str:
    lines = [p.line() for p in report.errors] + [f"warning: {p.line()}" for p in report.warnings]
    counts = ", ".join(f"{s}: {c['samples']} samples" + (f" ({c['bad']} bad)" if c["bad"] else "") for s, c in report.counts.items())
    lines.append(f"data: {counts or 'nothing read'}")
    for name, st in report.lengths.items():
        lines.append(f"tokens per sample ({name}; image tokens included, {st['mean_image_tokens']:.0f} per sample on average):")
        peak = max((c for _, c in st["histogram"]), default=0) or 1
        first = next((i for i, (_, c) in enumerate(st["histogram"]) if c), 0)
        for edge, c in st["histogram"][first:]:
            lines.append(f"  <= {edge:>6} {c:>7}  {'#' * max(1 if c else 0, round(40 * c / peak))}")
        sup = ", ".join(f"{k} {v:,}" for k, v in st["supervised_tokens"].items() if v)
        lines.append(f"  longest {st['max']}, median {st['median']:g}; {st['over_max_length']} over data.max_length {st['max_length']}"
                     f" (skipped or refused per data.on_overlength); supervised tokens: {sup or '0'}")
        lines += [f"  {p}" for p in st["problems"]]
    n_err, n_warn = len(report.errors), len(report.warnings)
    lines.append(f"{n_err} error{'s' if n_err != 1 else ''}, {n_warn} warning{'s' if n_warn != 1 else ''}")
    return "\n".join(lines)

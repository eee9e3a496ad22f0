"""Read CSV and JSONL data into `Sample`s: normalised conversations plus resolved image paths.

Every sample is a list of messages in the typed-content form that chat templates expect::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}]

with `images[i]` the path of the i-th `{"type": "image"}` part.

Accepted JSONL records: `messages` (OpenAI/TRL style; string content with `<image>`
placeholders, or typed content parts) or `conversations` (LLaVA/ShareGPT: `from`/`value`),
with `images` (list) or `image` (one path). Multi-turn is fine. An optional `references`
list adds acceptable answers for evaluation; in a CSV, a response/annotation cell holding a
JSON list of strings does the same (the first is the training target).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import Config, DataConfig, resolve_path
from ..errors import UserError
from .images import ImagePolicy, is_remote

log = logging.getLogger("vlmtune")

IMAGE_PLACEHOLDER = "<image>"
_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant", "system": "system"}


@dataclass
class Sample:
    id: str
    """`file:line` of the row: errors and predictions point back to it."""
    messages: list[dict[str, Any]]
    images: list[str] = field(default_factory=list)
    origin: str = ""
    """`path:line` of the row in its data file (ids may be user-given in JSONL)."""
    extra_references: list[str] = field(default_factory=list)
    """Further acceptable answers for evaluation (an `annotation` cell holding a JSON list,
    a JSONL `references` field); the first answer is always the last assistant turn."""
    image_policy: ImagePolicy = ImagePolicy()
    """How `images` load (remote fetching, pixel cap): the policy of the data config that
    admitted them (`ImageResolver`); every image loader applies it."""

    @property
    def references(self) -> list[str]:
        """Every reference answer for evaluation: [response, *extra_references]."""
        return [self.response, *self.extra_references]

    @property
    def response(self) -> str:
        """Text of the last assistant turn (the reference answer for evaluation)."""
        return message_text(self.messages[-1]) if self.messages and self.messages[-1]["role"] == "assistant" else ""

    @property
    def query(self) -> str:
        """Text of the last user turn."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return message_text(m)
        return ""

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the final assistant answer."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else list(self.messages)


def message_text(m: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")


def _split_placeholders(text: str) -> list[dict[str, Any]]:
    """'<image>\\nWhat?' -> [{"type": "image"}, {"type": "text", "text": "What?"}]."""
    parts: list[dict[str, Any]] = []
    chunks = text.split(IMAGE_PLACEHOLDER)
    for i, chunk in enumerate(chunks):
        if i > 0:
            parts.append({"type": "image"})
            chunk = chunk.lstrip("\n")  # LLaVA writes '<image>\n'; the template adds its own
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


class ImageResolver:
    """Resolves image paths of one data file.

    Relative paths resolve against `data.image_root` when set; otherwise the data file's
    folder, and where not found there, the working directory (the seed's `data/images/...`
    habit; `fallback_dir` stands for it where set: `data.image_fallback_dir`, which a run's
    saved config.yaml pins). A path may not leave those roots (absolute paths elsewhere,
    `..`, symlinks out) unless `allow_absolute`; `http(s)://` URLs pass through only where
    `policy` allows remote images (they are fetched, size-capped, when loaded). Every sample
    read through this resolver carries `policy`. Remembers which roots were used, for logs.
    """

    def __init__(self, data_file: Path, image_root: Optional[str], config_dir: Optional[str],
                 allow_absolute: bool = False, policy: ImagePolicy = ImagePolicy(), fallback_dir: Optional[str] = None):
        self.data_file = data_file
        if image_root:
            self.roots = [resolve_path(image_root, config_dir)]
        else:
            self.roots = [data_file.parent, resolve_path(fallback_dir) if fallback_dir else Path.cwd()]
        self.allow_absolute = allow_absolute
        self.policy = policy
        self._real_roots = [r.resolve() for r in self.roots]
        self.used: set[str] = set()

    @classmethod
    def for_config(cls, data_file: Path, data: DataConfig, config_dir: Optional[str]) -> "ImageResolver":
        return cls(data_file, data.image_root, config_dir, data.allow_absolute_paths, ImagePolicy.from_data(data), data.image_fallback_dir)

    def __call__(self, raw: str, where: str) -> str:
        if is_remote(raw):
            if not self.policy.allow_remote:
                raise UserError(where, f"remote image {raw!r}", "set data.allow_remote_images: true to fetch it, or download the images and use local paths")
            self.used.add("http(s)")
            return raw
        if "://" in raw.split("/", 1)[0] + "/":
            raise UserError(where, f"unsupported image location {raw!r}", "use a local path (or http(s):// with data.allow_remote_images)")
        p = Path(raw).expanduser()
        cands = [p] if p.is_absolute() else [root / p for root in self.roots]
        for cand in cands:
            if cand.is_file():
                real = cand.resolve()
                if not self.allow_absolute and not any(real.is_relative_to(r) for r in self._real_roots):
                    roots = ", ".join(str(r) for r in self.roots)
                    raise UserError(where, f"image {raw!r} lies outside its root ({roots})",
                                    "move it under data.image_root / the data file's folder / the working directory, or set data.allow_absolute_paths: true")
                self.used.add("absolute paths" if p.is_absolute() else str(cand.parent if len(self.roots) == 1 else next(r for r in self.roots if cand.is_relative_to(r))))
                return str(cand)
        if p.is_absolute():
            raise UserError(where, f"image {raw!r} does not exist", "fix the path")
        tried = ", ".join(str(r) for r in self.roots)
        raise UserError(where, f"image {raw!r} not found (looked in {tried})", "fix the path or set data.image_root")


def resolve_data_path(path: str, config_dir: Optional[str], where: str) -> Path:
    """Data files resolve against the working directory, then the config's folder (`config.resolve_path`)."""
    p = resolve_path(path, config_dir)
    if p.is_file():
        return p
    raise UserError(where, f"data file {path!r} not found", "fix the path (relative paths resolve against the working directory, then the config's folder)")


# Byte-order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
         (codecs.BOM_UTF8, "utf-8", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"))
_SAVE_AS_UTF8 = "save the file as UTF-8 (Excel: Save As > CSV UTF-8; editors: encoding UTF-8)"


def _lines_before(text: str) -> int:
    """How many line ends `text` holds (CRLF, LF or CR each count once, as in an editor)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def read_text(path: Path) -> str:
    """The text of a CSV or JSONL data file, as people have it: UTF-8 with or without a
    byte-order mark (Excel writes one), UTF-16 or UTF-32 with one; CRLF, LF or CR line ends,
    all returned as LF (so a file saved on Windows gives the same samples, and a CSV cell's
    embedded line break is always '\\n'). Every data-file reader goes through here.

    Anything else raises one line naming the file line of the first bad byte: bytes that are
    not UTF-8 (Latin-1, Windows-1252), and NUL characters, which no text data holds but
    UTF-16 without a byte-order mark decodes to as UTF-8."""
    raw = path.read_bytes()
    bom, encoding, name = next(((b, e, n) for b, e, n in _BOMS if raw.startswith(b)), (b"", "utf-8", "UTF-8"))
    body = raw[len(bom):]
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as e:
        line = _lines_before(body[: e.start].decode(encoding)) + 1
        raise UserError(f"{path}:{line}", f"not {name} text (byte 0x{body[e.start]:02x} at byte offset {len(bom) + e.start})", _SAVE_AS_UTF8) from None
    nul = text.find("\0")
    if nul >= 0:
        raise UserError(f"{path}:{_lines_before(text[:nul]) + 1}", "NUL characters in the text: UTF-16 without a byte-order mark, or not a text file",
                        _SAVE_AS_UTF8)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) for each non-blank row of a CSV file, header first, decoded by
    `read_text`. `line` is the file line the row starts on (what an editor shows): a quoted
    cell with line breaks makes its row span several lines, and the next row's number stays
    right. Quoting that does not parse (a quote never closed) raises one line naming where
    that row starts."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    end = 0  # the file line the previous row ended on
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{end + 1}", f"not valid CSV ({e})",
                            'check the quotes of the row starting here: a quoted cell must end with a quote, and a quote inside one is written ""') from None
        start, end = end + 1, reader.line_num
        if cells:  # a blank line is no row
            yield start, cells


def read_csv(path: Path, data: DataConfig, resolve: ImageResolver, problems: Optional[list[UserError]] = None) -> list[Sample]:
    """Samples of a CSV file. File-level problems raise; a bad row raises too, unless
    `problems` is given: then it is appended there and the row skipped (`vlmtune check`,
    `data.on_bad_sample: skip`)."""
    samples = []
    rows = csv_rows(path)
    header_line, cols = next(rows, (1, []))

    def pick(primary: str, fallback: str, key: str) -> str:
        if primary in cols:
            return primary
        if fallback in cols:
            return fallback
        raise UserError(f"{path}:{header_line}", f"no column {primary!r} (columns: {', '.join(cols) or 'none'})", f"rename the column or set data.{key}")

    image_col = pick(data.image_column, data.image_column, "image_column")
    instr_col = pick(data.instruction_column, data.query_column, "instruction_column")
    resp_col = pick(data.response_column, data.annotation_column, "response_column")
    for line, fields in rows:
        row = dict(zip(cols, fields))  # a short row's missing cells read as empty
        try:
            where = f"{path}:{line}"
            vals = {}
            for col in (image_col, instr_col, resp_col):
                v = row.get(col)
                if v is None or not v.strip():
                    raise UserError(f"{where}: {col}", "empty", "fill it in or remove the row")
                vals[col] = v
            image = resolve(vals[image_col].strip(), f"{where}: {image_col}")
            answers = _answer_list(vals[resp_col], f"{where}: {resp_col}")
            msgs = []
            if data.system_message:
                msgs.append({"role": "system", "content": [{"type": "text", "text": data.system_message}]})
            msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vals[instr_col]}]})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answers[0]}]})
            samples.append(Sample(id=f"{path.name}:{line}", messages=msgs, images=[image], origin=where, extra_references=answers[1:],
                                  image_policy=resolve.policy))
        except UserError as e:
            if problems is None:
                raise
            problems.append(e)
    return samples


def _answer_list(cell: str, where: str) -> list[str]:
    """A response/annotation cell: plain text, or a JSON list of reference answers
    (`["two", "2"]`) for evaluation sets with several acceptable answers."""
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            return [cell]  # a literal answer that happens to look like a list
        if isinstance(val, list) and val and all(isinstance(v, str) for v in val):
            if not any(v.strip() for v in val):
                raise UserError(where, "every answer in the list is empty", "fill in at least one answer")
            return val
        raise UserError(where, "a JSON list of answers must hold non-empty strings", 'write e.g. ["two", "2"]')
    return [cell]


def _normalise_record(rec: Any, where: str, sample_id: str, resolve: ImageResolver, system_message: Optional[str]) -> Sample:
    if not isinstance(rec, dict):
        raise UserError(where, "a JSON line must be an object", "write one {\"messages\": [...], \"images\": [...]} per line")
    if "messages" in rec:
        turns, key = rec["messages"], "messages"
    elif "conversations" in rec:
        turns, key = rec["conversations"], "conversations"
    else:
        raise UserError(where, "no 'messages' or 'conversations' field", "add one (list of {role, content} or {from, value})")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {key}", "must be a non-empty list", "add the conversation turns")
    raw_images = rec.get("images", rec.get("image", []))
    if isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list):
        raise UserError(f"{where}: images", "must be a list of paths", "write images: [\"a.jpg\"]")
    messages: list[dict[str, Any]] = []
    inline_images: list[Optional[str]] = []
    for i, t in enumerate(turns):
        tw = f"{where}: {key}[{i}]"
        if not isinstance(t, dict):
            raise UserError(tw, "must be an object", "use {\"role\": ..., \"content\": ...}")
        role_raw = t.get("role", t.get("from"))
        role = _ROLE.get(str(role_raw).lower()) if role_raw is not None else None
        if role is None:
            raise UserError(f"{tw}.role", f"unknown role {role_raw!r}", "use system, user or assistant (or human/gpt)")
        content = t.get("content", t.get("value"))
        if isinstance(content, str):
            parts = _split_placeholders(content)
            inline_images += [None] * sum(p["type"] == "image" for p in parts)
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                ptype = p.get("type") if isinstance(p, dict) else None
                if ptype == "text":
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
                elif ptype in ("image", "image_url"):
                    parts.append({"type": "image"})
                    src = p.get("image") or p.get("path") or p.get("url")
                    iu = p.get("image_url")
                    if src is None and iu is not None:
                        src = iu.get("url") if isinstance(iu, dict) else iu
                    inline_images.append(src if isinstance(src, str) else None)
                else:
                    raise UserError(f"{tw}.content[{j}]", f"unknown content part {p!r}", "use {\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"}")
        else:
            raise UserError(f"{tw}.content", "missing or not text", "give each turn a string or a list of content parts")
        if role == "assistant" and any(p["type"] == "image" for p in parts):
            raise UserError(f"{tw}.content", "an assistant turn contains an image", "images belong in user turns")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(where, "conversation has no assistant turn", "add the answer to learn as an assistant turn")
    for m in messages:
        if m["role"] == "assistant" and not message_text(m).strip():
            raise UserError(where, "an assistant turn is empty", "fill it in or drop the turn")
    n_slots = len(inline_images)
    named = [s for s in inline_images if s]
    if named and raw_images:
        raise UserError(where, "images given both inline and in 'images'", "use one of the two")
    images = named or list(raw_images)
    if n_slots == 0 and images:
        # No placeholder: put the images at the start of the first user turn (LLaVA convention).
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise UserError(where, "images but no user turn", "add a user turn")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
        n_slots = len(images)
    if n_slots != len(images):
        raise UserError(where, f"{n_slots} image placeholders but {len(images)} images", "make every <image> placeholder match one entry of 'images'")
    resolved = [resolve(str(im), f"{where}: images[{k}]") for k, im in enumerate(images)]
    if system_message and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_message}]})
    extra = rec.get("references", [])
    if isinstance(extra, str):
        extra = [extra]
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise UserError(f"{where}: references", "must be a list of strings", 'write "references": ["two", "2"]')
    return Sample(id=str(rec.get("id", sample_id)), messages=messages, images=resolved, extra_references=[x for x in extra if x != message_text(messages[-1])],
                  image_policy=resolve.policy)


def jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """('path:line', parsed JSON) for each non-empty line of a JSONL file (data, predictions),
    decoded by `read_text`: a file that is not text in a known encoding raises on the first
    step; a line that is not JSON gives a UserError in place of the value, for the caller to
    raise or collect."""
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, UserError(where, f"not valid JSON ({e.msg} at column {e.colno})", "fix the line or remove it")


def read_jsonl(path: Path, data: DataConfig, resolve: ImageResolver, problems: Optional[list[UserError]] = None) -> list[Sample]:
    """Samples of a JSONL file; a bad line raises, or with `problems` is recorded and skipped."""
    samples = []
    for where, rec in jsonl_lines(path):
        try:
            if isinstance(rec, UserError):
                raise rec
            sample = _normalise_record(rec, where, f"{path.name}:{where.rsplit(':', 1)[1]}", resolve, data.system_message)
            sample.origin = where
            samples.append(sample)
        except UserError as e:
            if problems is None:
                raise
            problems.append(e)
    return samples


def load_split(cfg: Config, split: str, problems: Optional[list[UserError]] = None) -> Optional[list[Sample]]:
    """Samples of `split` (train/val/test), or None when the config names no file for it.
    With `problems`, bad rows are recorded there and skipped instead of raising."""
    d = cfg.data
    for kind in ("csv", "jsonl"):
        raw = getattr(d, f"{split}_{kind}")
        if not raw:
            continue
        path = resolve_data_path(raw, cfg.config_dir, f"data.{split}_{kind}")
        resolver = ImageResolver.for_config(path, d, cfg.config_dir)
        samples = (read_csv if kind == "csv" else read_jsonl)(path, d, resolver, problems)
        if not samples and not problems:
            raise UserError(str(path), "no samples", "add rows, or remove the file from the config")
        log.info("%s: %d samples from %s (images resolved against %s)", split, len(samples), path, ", ".join(sorted(resolver.used)) or "-")
        return samples
    return None


def load_jsonl_file(path: str | os.PathLike, data: Optional[DataConfig] = None, image_root: Optional[str] = None) -> list[Sample]:
    """Read a JSONL file outside a config (the `--dataset` quick form)."""
    p = resolve_data_path(str(path), None, "--dataset")
    d = data or DataConfig()
    return read_jsonl(p, d, ImageResolver(p, image_root or d.image_root, None, d.allow_absolute_paths, ImagePolicy.from_data(d), d.image_fallback_dir))

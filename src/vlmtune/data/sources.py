"""Read data in every shape users have into `Sample`s: normalised conversations plus
resolved images. docs/data-formats.md shows each shape.

Every sample is a list of messages in the typed-content form that chat templates expect::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}]

with `images[i]` the i-th `{"type": "image"}` part's image (`ImageRef`: a path, a URL, or
`ImageBytes` held in memory).

Files and formats (`read_data`; detected from the extension and the content, or
`data.format`): CSV (image, instruction, response columns); JSON records, as one JSON array
(`.json`, how LLaVA and LLaMA-Factory ship data) or one per line (JSONL); Parquet, Arrow,
a `datasets` save_to_disk folder and hub ids, read with `datasets` (rows become records).

Records, whatever the file (`_normalise_record`, the one normaliser): `messages`
(role/content) or `conversations` (LLaVA/ShareGPT: from/value), content being a string with
`<image>` placeholders or a list of typed parts (TRL/HF `{"type": "image"}` and
`{"type": "text", "text": ...}`; OpenAI `{"type": "image_url", "image_url": {"url": ...}}`);
or flat `instruction`/`response` fields. Images come from `images` (list) or `image` (one),
unless the parts name them inline; paths, `data:` URIs, http(s) URLs (with
data.allow_remote_images), bytes and `{"bytes", "path"}` dicts (`datasets.Image`).
`data.columns` maps other field or column names onto these. Multi-turn is fine: every
assistant turn is supervised; images stand where their placeholders are, or without any
placeholder at the start of the first user turn (LLaVA / LLaMA-Factory). An optional
`references` list adds acceptable answers for evaluation; in a CSV, a response/annotation
cell holding a JSON list of strings does the same (the first is the training target).

Where a problem is: `file:line` for CSV and JSONL, `file:row N` (1-based record index) for
JSON arrays and tables, then the field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import Config, DataConfig, resolve_path
from ..errors import UserError
from .images import ImageBytes, ImagePolicy, ImageRef, decode_data_uri, is_data_uri, is_remote

log = logging.getLogger("vlmtune")

IMAGE_PLACEHOLDER = "<image>"
_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant", "system": "system"}


@dataclass
class Sample:
    id: str
    """`file:line` of the row: errors and predictions point back to it."""
    messages: list[dict[str, Any]]
    images: list[ImageRef] = field(default_factory=list)
    origin: str = ""
    """`path:line` of the row in its data file (ids may be user-given in JSONL)."""
    extra_references: list[str] = field(default_factory=list)
    """Further acceptable answers for evaluation (an `annotation` cell holding a JSON list,
    a JSONL `references` field); the first answer is always the last assistant turn."""
    image_policy: ImagePolicy = ImagePolicy()
    """How `images` load (remote fetching, pixel cap): the policy of the data config that
    admitted them (`ImageResolver`); every image loader applies it."""
    image_fields: list[str] = field(default_factory=list)
    """The row's field naming each image (`url`, `images[1]`, a mapped column): the data
    check points at it."""

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
    """Resolves the images of one data file: paths, and what needs no path (`data:` URIs,
    bytes from a table, made `ImageBytes`).

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

    def __call__(self, raw: Any, where: str) -> ImageRef:
        """An image as a row gives it: a path, URL or `data:` URI; bytes; a `{"bytes",
        "path"}` dict (`datasets.Image` storage); a PIL image."""
        if isinstance(raw, dict):
            data, path = raw.get("bytes"), raw.get("path")
            if data:
                return self._bytes(data, str(path) if path else "", where)
            if not isinstance(path, str) or not path:
                raise UserError(where, "an image entry with neither bytes nor a path", "give the image's bytes or its file path")
            raw = path
        if isinstance(raw, (bytes, bytearray, memoryview)):
            return self._bytes(bytes(raw), "", where)
        if not isinstance(raw, str):
            from PIL import Image

            if isinstance(raw, Image.Image):
                buf = io.BytesIO()
                raw.save(buf, format="PNG")
                return self._bytes(buf.getvalue(), "", where)
            raise UserError(where, f"not an image reference ({type(raw).__name__} {str(raw)[:40]!r})", "give a path, URL, data: URI or the image's bytes")
        raw = raw.strip()
        if not raw:
            raise UserError(where, "empty image path", "fill it in or remove the row")
        if is_data_uri(raw):
            self.used.add("data: URIs")
            return decode_data_uri(raw, where)
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


    def _bytes(self, data: bytes, name: str, where: str) -> ImageBytes:
        self.used.add("embedded bytes")
        return ImageBytes(data, f"{name or 'embedded image'} ({len(data):,} bytes)")


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

    mapped = data.columns or {}
    image_col = pick(mapped.get("image", data.image_column), mapped.get("image", data.image_column), "columns.image" if "image" in mapped else "image_column")
    instr_col = pick(mapped.get("instruction", data.instruction_column), mapped.get("instruction", data.query_column),
                     "columns.instruction" if "instruction" in mapped else "instruction_column")
    resp_col = pick(mapped.get("response", data.response_column), mapped.get("response", data.annotation_column),
                    "columns.response" if "response" in mapped else "response_column")
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
                                  image_policy=resolve.policy, image_fields=[image_col]))
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


def _get(d: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` whose value in `d` is not None: rows of an Arrow table carry every
    field of a struct, the ones a record does not use as None."""
    for k in keys:
        v = d.get(k)
        if v is not None:
            return v
    return None


def _kind(value: Any) -> str:
    """How a JSON value is called in messages: 'an object', 'a list', 'a number', ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else f"a {type(value).__name__}"


_RECORD_FIX = 'write each record as {"messages": [...], "images": [...]} (or LLaVA\'s {"conversations": [...], "image": ...})'


def _map_fields(rec: Any, columns: Optional[dict[str, str]]) -> Any:
    """`rec` with the fields `data.columns` names read from their own keys: {images: photos}
    makes `images` the record's `photos` (and ignores any `images` of its own)."""
    if not columns or not isinstance(rec, dict):
        return rec
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    for key, col in columns.items():
        out[key] = rec.get(col)
    return out


def _normalise_record(rec: Any, where: str, sample_id: str, resolve: ImageResolver, data: DataConfig) -> Sample:
    """One record of any JSON shape (or a table row made a record) as a `Sample`. `where` is
    `file:line` or `file:row N`; fields in messages carry the user's names (`data.columns`)."""
    names = data.columns or {}

    def nm(key: str) -> str:
        return names.get(key, key)

    if not isinstance(rec, dict):
        raise UserError(where, f"a record must be an object, not {_kind(rec)}", _RECORD_FIX)
    rec = _map_fields(rec, data.columns)
    conv_key = next((k for k in ("messages", "conversations") if rec.get(k) is not None), None)
    image_keys: tuple[str, ...] = ("images", "image")
    extra_answers: list[str] = []
    if conv_key is not None:
        turns = rec[conv_key]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: {nm(conv_key)}", "must be a non-empty list", "add the conversation turns")
        turn_names = [f"{nm(conv_key)}[{i}]" for i in range(len(turns))]
    else:
        # The CSV shape as a record: instruction + response (+ image), e.g. a Parquet table.
        instr_key = next((k for k in ("instruction", data.instruction_column, data.query_column) if rec.get(k) is not None), None)
        resp_key = next((k for k in ("response", data.response_column, data.annotation_column) if rec.get(k) is not None), None)
        if instr_key is None and resp_key is None:
            raise UserError(where, f"no {nm('messages')!r} or {nm('conversations')!r} field (nor instruction and response)",
                            "add one (a list of {role, content} or {from, value}), or map yours with data.columns")
        if instr_key is None or resp_key is None:
            missing = nm("response") if instr_key else nm("instruction")
            raise UserError(where, f"an instruction/response record without {missing!r}", f"add {missing!r} (data.columns maps another field onto it)")
        instr_name, resp_name = nm(instr_key), nm(resp_key)
        instr, resp = rec[instr_key], rec[resp_key]
        if not isinstance(instr, str) or not instr.strip():
            raise UserError(f"{where}: {instr_name}", "empty" if isinstance(instr, str) else f"must be text, not {_kind(instr)}", "fill it in or remove the row")
        if isinstance(resp, list) and resp and all(isinstance(x, str) for x in resp):
            answers = list(resp)
        elif isinstance(resp, str) and resp.strip():
            answers = _answer_list(resp, f"{where}: {resp_name}")
        else:
            raise UserError(f"{where}: {resp_name}", "empty" if isinstance(resp, str) else f"must be text, not {_kind(resp)}", "fill it in or remove the row")
        turns = [{"role": "user", "content": instr}, {"role": "assistant", "content": answers[0]}]
        extra_answers = answers[1:]
        turn_names = [instr_name, resp_name]
        image_keys = ("images", "image", data.image_column)
    img_key = next((k for k in image_keys if rec.get(k) is not None), None)
    raw_images = rec[img_key] if img_key is not None else []
    if isinstance(raw_images, list):
        raw_fields = [f"{nm(img_key)}[{k}]" for k in range(len(raw_images))]
    else:  # one image: a path, bytes, or a {"bytes", "path"} dict
        raw_images, raw_fields = [raw_images], [nm(img_key or "image")]
    messages: list[dict[str, Any]] = []
    n_slots = 0
    inline: list[tuple[Any, str]] = []  # (image, field) named by typed parts themselves
    for i, t in enumerate(turns):
        tw = f"{where}: {turn_names[i]}"
        if not isinstance(t, dict):
            raise UserError(tw, f"must be an object, not {_kind(t)}", "use {\"role\": ..., \"content\": ...} (or LLaVA's {\"from\": ..., \"value\": ...})")
        role_raw = _get(t, "role", "from")
        role = _ROLE.get(str(role_raw).lower()) if role_raw is not None else None
        if role is None:
            raise UserError(f"{tw}.role", f"unknown role {role_raw!r}", "use system, user or assistant (or human/gpt)")
        content = _get(t, "content", "value")
        if isinstance(content, str):
            parts = _split_placeholders(content)
            n_slots += sum(p["type"] == "image" for p in parts)
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                ptype = p.get("type") if isinstance(p, dict) else None
                if ptype in ("text", "input_text"):
                    parts.append({"type": "text", "text": str(_get(p, "text") or "")})
                elif ptype in ("image", "image_url", "input_image"):
                    parts.append({"type": "image"})
                    n_slots += 1
                    src = _get(p, "image", "path", "url")
                    iu = p.get("image_url")
                    field_name = f"{turn_names[i]}.content[{j}]"
                    if src is None and iu is not None:
                        src = iu.get("url") if isinstance(iu, dict) else iu
                        field_name += ".image_url"
                    if src is not None:
                        inline.append((src, field_name))
                else:
                    raise UserError(f"{tw}.content[{j}]", f"unknown content part {p!r}"[:200],
                                    'use {"type": "text", "text": ...}, {"type": "image"} or {"type": "image_url", "image_url": {"url": ...}}')
        else:
            raise UserError(f"{tw}.content", "missing or not text", "give each turn a string or a list of content parts")
        if role == "assistant" and any(p["type"] == "image" for p in parts):
            raise UserError(f"{tw}.content", "an assistant turn contains an image", "images belong in user turns")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(where, "conversation has no assistant turn", "add the answer to learn as an assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not message_text(m).strip():
            raise UserError(f"{where}: {turn_names[i]}", "an assistant turn is empty", "fill it in or drop the turn")
    if inline and raw_images:
        raise UserError(where, f"images given both inline and in {nm(img_key or 'images')!r}", "use one of the two")
    images, fields = ([s for s, _ in inline], [f for _, f in inline]) if inline else (list(raw_images), raw_fields)
    if n_slots == 0 and images:
        # No placeholder: the images go at the start of the first user turn (LLaVA, LLaMA-Factory).
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise UserError(where, "images but no user turn", "add a user turn")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
        n_slots = len(images)
    if n_slots != len(images):
        field_name = f"{where}: {nm(img_key)}" if img_key else where
        raise UserError(field_name, f"{n_slots} image placeholders but {len(images)} images",
                        f"make every <image> placeholder (or image part) match one entry of {nm(img_key or 'images')!r}")
    resolved = [resolve(im, f"{where}: {f}") for im, f in zip(images, fields)]
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: {nm('system')}", f"must be text, not {_kind(system)}", "write the system message as a string")
    system = system or data.system_message
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    extra = rec.get("references")
    extra = [] if extra is None else [extra] if isinstance(extra, str) else extra
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise UserError(f"{where}: {nm('references')}", "must be a list of strings", 'write "references": ["two", "2"]')
    last = message_text(messages[-1])
    refs = [x for x in [*extra_answers, *extra] if x != last]
    rid = rec.get("id")
    return Sample(id=str(rid) if rid is not None and not isinstance(rid, (dict, list)) else sample_id, messages=messages, images=resolved,
                  extra_references=list(dict.fromkeys(refs)), image_policy=resolve.policy, image_fields=fields)


def jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """('path:line', parsed JSON) for each non-empty line of a JSONL file (data, predictions),
    decoded by `read_text`: a file that is not text in a known encoding raises on the first
    step; a line that is not JSON gives a UserError in place of the value, for the caller to
    raise or collect."""
    yield from _lines(path, read_text(path))


def _lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, UserError(where, f"not valid JSON ({e.msg} at column {e.colno})", "fix the line or remove it")


_ARRAY_FIX = "a .json data file holds one array of records, [{...}, {...}] (LLaVA, LLaMA-Factory); or write one record per line in a .jsonl file"
_RECORD_KEYS = ("messages", "conversations", "instruction", "response", "images", "image")


def json_records(path: Path, mode: str = "auto") -> Iterator[tuple[str, Any]]:
    """('where', record) for each record of a JSON data file, decoded by `read_text`.

    `mode`: "json", one array of records (`file:row N`, the 1-based index); "jsonl", one
    record per line (`file:line`); "auto", told by the content: an array, one record, or
    lines. A file that does not parse at all, or holds something other than records, raises
    one line; a bad JSONL line or a record that is not an object comes in place of the
    record as a UserError, for the caller to raise or collect."""
    text = read_text(path)
    stripped = text.lstrip()
    if mode == "jsonl":
        yield from _lines(path, text)
        return
    if mode == "auto" and stripped[:1] != "[":
        first = next((line for line in text.split("\n") if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            pass  # not JSONL either: parse the whole file below for a useful error
        else:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                yield from _lines(path, text)  # several records, one per line
                return
            if not (isinstance(whole, dict) and any(k in whole for k in _RECORD_KEYS)):
                raise UserError(str(path), f"not an array of records: the file holds {_kind(whole)}" + (f" with keys {', '.join(list(whole)[:6])}" if isinstance(whole, dict) else ""), _ARRAY_FIX)
            yield f"{path}:1", whole  # one record
            return
    if not stripped:
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", f"fix the file: {_ARRAY_FIX}") from None
    if not isinstance(whole, list):
        raise UserError(str(path), f"not an array of records: the file holds {_kind(whole)}" + (f" with keys {', '.join(list(whole)[:6])}" if isinstance(whole, dict) else ""), _ARRAY_FIX)
    for i, rec in enumerate(whole, start=1):
        yield f"{path}:row {i}", rec


def _sample_id(path_name: str, where: str) -> str:
    return f"{path_name}:{where.rsplit(':', 1)[1]}"


def read_records(records: Iterator[tuple[str, Any]], name: str, data: DataConfig, resolve: ImageResolver,
                 problems: Optional[list[UserError]] = None) -> list[Sample]:
    """Samples of ('where', record) pairs (`json_records`, table rows); a bad record raises,
    or with `problems` is recorded and skipped. `name` starts the default sample ids."""
    samples = []
    for where, rec in records:
        try:
            if isinstance(rec, UserError):
                raise rec
            sample = _normalise_record(rec, where, _sample_id(name, where), resolve, data)
            sample.origin = where
            samples.append(sample)
        except UserError as e:
            if problems is None:
                raise
            problems.append(e)
    return samples


def read_jsonl(path: Path, data: DataConfig, resolve: ImageResolver, problems: Optional[list[UserError]] = None, mode: str = "auto") -> list[Sample]:
    """Samples of a JSON data file: JSONL, or a JSON array (told by the content unless `mode`
    is "json" or "jsonl"); a bad record raises, or with `problems` is recorded and skipped."""
    return read_records(json_records(path, mode), path.name, data, resolve, problems)


# --------------------------------------------------------------------------------------
# Parquet, Arrow and Hugging Face `datasets`: read with `datasets`, rows made records.

_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
_DATA_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
                  ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
FORMATS = ("csv", "jsonl", "json", "parquet", "arrow", "hf")


@dataclass
class DataSource:
    """Where one split's data is and how it reads (`locate`)."""

    kind: str
    """csv, jsonl, json, json-auto (told by the content), parquet, arrow, disk (a
    save_to_disk folder), folder (a folder of data files), hub (a hub id)."""
    target: str
    """The local path, or the hub id."""
    label: str
    """How messages name it: the path, or `id` for a hub id."""

    @property
    def path(self) -> Path:
        return Path(self.target)


def _sniff(path: Path) -> Optional[str]:
    """A data file's format from its first bytes, where its extension says nothing."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    for bom, enc, _ in _BOMS:
        if head.startswith(bom):
            head = head[len(bom):].decode(enc, errors="ignore").encode()
            break
    if head.lstrip()[:1] in (b"[", b"{"):
        return "json-auto"
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def locate(raw: str, fmt: Optional[str], config_dir: Optional[str], where: str) -> DataSource:
    """Where data named `raw` (a data.*_file value) is and its format: `fmt` when given, else
    the extension, else the first bytes; a folder is a save_to_disk dataset or a folder of
    data files; a name found nowhere that looks like `owner/name` is a hub id."""
    p = resolve_path(raw, config_dir)
    fix_fmt = f"set data.format to one of {', '.join(FORMATS)}"
    if p.is_dir():
        if fmt not in (None, "hf"):
            raise UserError(where, f"{raw!r} is a folder, but data.format is {fmt}", "name the file itself, or set data.format: hf for a `datasets` folder")
        return DataSource("disk" if _is_saved_dataset(p) else "folder", str(p), str(p))
    if p.is_file():
        if fmt == "hf":
            raise UserError(where, f"{raw!r} is a file, but data.format: hf reads folders and hub ids", f"{fix_fmt} that fits the file, or leave it out")
        if fmt:
            return DataSource(fmt, str(p), str(p))
        kind = _DATA_SUFFIXES.get(p.suffix.lower())
        if kind in ("json", "jsonl"):
            kind = "json-auto"  # the content tells an array from lines
        kind = kind or _sniff(p)
        if kind is None:
            raise UserError(where, f"cannot tell the format of {raw!r} from its extension ({p.suffix or 'none'}) or its content", fix_fmt)
        return DataSource(kind, str(p), str(p))
    looks_like_hub = bool(_HUB_ID.fullmatch(raw)) and ("/" in raw or fmt == "hf") and Path(raw).suffix.lower() not in _DATA_SUFFIXES
    if fmt == "hf" or (fmt is None and looks_like_hub):
        if not _HUB_ID.fullmatch(raw):
            raise UserError(where, f"{raw!r} is neither a local folder nor a hub id", "fix the path, or give a hub id as owner/name")
        return DataSource("hub", raw, raw)
    raise UserError(where, f"data file {raw!r} not found", "fix the path (relative paths resolve against the working directory, then the config's folder)")


def _load_dataset(src: DataSource, split: str, data: DataConfig, where: str) -> tuple[Any, str]:
    """The `datasets.Dataset` of `src` for `split`, and its label for messages."""
    import datasets

    if os.environ.get("VLMTUNE_NO_PROGRESS") == "1":
        datasets.disable_progress_bars()
    what = {"parquet": "Parquet", "arrow": "Arrow", "disk": "a `datasets` save_to_disk folder", "folder": "a `datasets` data folder", "hub": "a Hugging Face dataset"}[src.kind]
    try:
        if src.kind in ("parquet", "arrow"):
            ds = datasets.load_dataset(src.kind, data_files=src.target, split="train")
        elif src.kind == "disk":
            ds = datasets.load_from_disk(src.target)
        else:
            ds = datasets.load_dataset(src.target, data.hf_config_name)  # the real hub path (or a local folder of files)
    except Exception as e:  # noqa: BLE001 -- pyarrow, fsspec, hub and builder errors all mean: this data does not load
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        fix = ("check the hub id and the network (or HF_TOKEN for a gated dataset), or download it and use save_to_disk" if src.kind == "hub"
               else f"check that the file is {what} (or set data.format)")
        raise UserError(src.label, f"cannot be read as {what} ({type(e).__name__}: {msg})", fix) from None
    label = src.label
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds)
        want = (data.splits or {}).get(split)
        choice = want if want is not None else next((n for n in _SPLIT_NAMES[split] if n in ds), names[0] if len(names) == 1 else None)
        if choice not in ds:
            raise UserError(f"{src.label}: split", f"no split {choice!r} for data.{split}_file (splits: {', '.join(names)})" if choice else
                            f"which split is data.{split}_file? (splits: {', '.join(names)})", f"set data.splits.{split} to one of {', '.join(names)}")
        ds, label = ds[choice], f"{src.label}[{choice}]"
    return ds, label


def read_dataset(ds: Any, label: str, data: DataConfig, resolve: ImageResolver, problems: Optional[list[UserError]] = None) -> list[Sample]:
    """Samples of a `datasets.Dataset`, one record per row (`label:row N`). Image columns are
    read as stored (`datasets.Image`: {"bytes", "path"}; or bytes, or paths), never decoded
    here. A column `data.columns` names that is not there, or no conversation and no
    instruction/response columns, raise one line."""
    cols = list(ds.column_names)
    have = ", ".join(cols) or "none"
    for key, col in (data.columns or {}).items():
        if col not in cols:
            raise UserError(label, f"no column {col!r}, which data.columns.{key} names (columns: {have})", f"set data.columns.{key} to one of the columns")
    fields = set(cols) | set(data.columns or {})
    convo = {"messages", "conversations"} & fields
    flat = ({"instruction", data.instruction_column, data.query_column} & fields) and ({"response", data.response_column, data.annotation_column} & fields)
    if not convo and not flat:
        raise UserError(label, f"no messages or conversations column, nor instruction and response columns (columns: {have})",
                        "name yours with data.columns, e.g. columns: {messages: dialog, images: photos}")

    def rows() -> Iterator[tuple[str, Any]]:
        n = 0
        for batch in ds.with_format("arrow").iter(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield f"{label}:row {n}", row

    return read_records(rows(), label.rsplit("/", 1)[-1], data, resolve, problems)


def read_data(src: DataSource, data: DataConfig, config_dir: Optional[str], split: str, where: str,
              problems: Optional[list[UserError]] = None) -> tuple[list[Sample], ImageResolver]:
    """Samples of one located data source (`locate`) and the resolver that found its images."""
    if src.kind in ("csv", "jsonl", "json", "json-auto"):
        resolver = ImageResolver.for_config(src.path, data, config_dir)
        if src.kind == "csv":
            return read_csv(src.path, data, resolver, problems), resolver
        return read_jsonl(src.path, data, resolver, problems, mode="auto" if src.kind == "json-auto" else src.kind), resolver
    # Relative image paths in a table: beside a file, inside a folder (imagefolder's absolute
    # paths stay within it), or from the working directory for a hub id.
    anchor = src.path if src.kind in ("parquet", "arrow") else src.path / "-" if src.kind in ("disk", "folder") else Path.cwd() / "-"
    resolver = ImageResolver.for_config(anchor, data, config_dir)
    ds, label = _load_dataset(src, split, data, where)
    return read_dataset(ds, label, data, resolver, problems), resolver


def split_source(cfg: Config, split: str) -> Optional[tuple[str, DataSource]]:
    """The config key naming `split`'s data and where that data is (None: no data for it)."""
    d = cfg.data
    for key in (f"{split}_file", f"{split}_csv", f"{split}_jsonl"):
        raw = getattr(d, key)
        if not raw:
            continue
        if key.endswith("_file"):
            return key, locate(raw, d.format, cfg.config_dir, f"data.{key}")
        path = resolve_data_path(raw, cfg.config_dir, f"data.{key}")
        return key, DataSource("csv" if key.endswith("_csv") else "json-auto", str(path), str(path))
    return None


def load_split(cfg: Config, split: str, problems: Optional[list[UserError]] = None) -> Optional[list[Sample]]:
    """Samples of `split` (train/val/test), or None when the config names no data for it.
    With `problems`, bad rows are recorded there and skipped instead of raising."""
    found = split_source(cfg, split)
    if found is None:
        return None
    key, src = found
    samples, resolver = read_data(src, cfg.data, cfg.config_dir, split, f"data.{key}", problems)
    if not samples and not problems:
        raise UserError(src.label, "no samples", "add rows, or remove the file from the config")
    log.info("%s: %d samples from %s (%s; images from %s)", split, len(samples), src.label, src.kind.removesuffix("-auto"), ", ".join(sorted(resolver.used)) or "-")
    return samples


def load_data_file(path: str, data: DataConfig, where: str, fmt: Optional[str] = None) -> list[Sample]:
    """Samples of one data file or dataset in any format, outside a config (`vlmtune
    evaluate`, the `--dataset` quick form): paths resolve against the working directory."""
    src = locate(path, fmt, None, where)
    return read_data(src, data, None, "test", where)[0]


def load_jsonl_file(path: str | os.PathLike, data: Optional[DataConfig] = None, image_root: Optional[str] = None) -> list[Sample]:
    """Read a JSONL file outside a config (the `--dataset` quick form)."""
    p = resolve_data_path(str(path), None, "--dataset")
    d = data or DataConfig()
    return read_jsonl(p, d, ImageResolver(p, image_root or d.image_root, None, d.allow_absolute_paths, ImagePolicy.from_data(d), d.image_fallback_dir))

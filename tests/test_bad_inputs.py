"""A corpus of malformed inputs (Reliability issue): each gives one line naming the file, the
line and the field, exit code 1, no traceback -- from `vlmtune check` and from `vlmtune train`,
which refuses before any model loads and leaves no run directory behind."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from vlmtune.cli import main

OK_ROW = "images/ok.png,What color?,red"


def _png_header(w: int, h: int) -> bytes:
    """A PNG that is only a header: claims any size without any pixel data."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _base(d: Path) -> None:
    (d / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (255, 0, 0)).save(d / "images" / "ok.png")


def _config(d: Path, data: dict | None = None, **top) -> Path:
    cfg = {
        "experiment_name": "bad", "output_dir": str(d / "out"),
        "data": {"train_csv": str(d / "train.csv"), **(data or {})},
        "models": [{"name": "m", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 3136}],
        "training": {"max_steps": 1},
        **top,
    }
    p = d / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _csv(d: Path, *rows: str, header: str = "url,instruction,response", name: str = "train.csv") -> Path:
    p = d / name
    p.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return p


def _jsonl(d: Path, *records) -> Path:
    p = d / "train.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return p


def _ok_rec(text="<image>What color?", answer="red", images=("images/ok.png",)):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}], "images": list(images)}


def _image_case(make: Callable[[Path], None], name: str) -> Callable[[Path], tuple[Path, str, str]]:
    def case(d: Path):
        make(d / "images" / name)
        _csv(d, OK_ROW, f"images/{name},What color?,red")
        return _config(d), f"{d / 'train.csv'}:3: url", ""
    return case


def _truncated(p: Path) -> None:
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(p)
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


# name -> builder returning (config path, where the error must point, text it must contain)
CASES: dict[str, Callable[[Path], tuple[Path, str, str]]] = {}


def case(name: str):
    def reg(fn):
        CASES[name] = fn
        return fn
    return reg


@case("config_missing")
def _(d):
    return d / "nope.yaml", f"{d / 'nope.yaml'}", "config file not found"


@case("config_bad_yaml")
def _(d):
    p = d / "config.yaml"
    p.write_text("experiment_name: x\nmodels: [\n  - {name: m\n")
    return p, f"{p}:", "not valid YAML"


@case("config_unknown_key")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, training={"max_step": 1})
    return cfg, f"{cfg}: training.max_step", "did you mean `max_steps`"


@case("config_wrong_type")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, training={"learning_rate": "fast"})
    return cfg, f"{cfg}: training.learning_rate", "expected a number"


@case("duplicate_run_names")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, lora_variants=[{"name": "a"}, {"name": "a"}])
    return cfg, f"{cfg}: lora_variants[1].name", "duplicate variant name"


@case("data_file_missing")
def _(d):
    return _config(d), "data.train_csv", "not found"


@case("csv_missing_column")
def _(d):
    _csv(d, "images/ok.png,What color?", header="url,instruction")
    return _config(d), f"{d / 'train.csv'}:1", "no column 'response'"


@case("csv_empty_field")
def _(d):
    _csv(d, OK_ROW, "images/ok.png,What color?,")
    return _config(d), f"{d / 'train.csv'}:3: response", "empty"


@case("csv_whitespace_field")
def _(d):
    _csv(d, OK_ROW, "images/ok.png,   ,red")
    return _config(d), f"{d / 'train.csv'}:3: instruction", "empty"


@case("csv_not_utf8")
def _(d):
    p = _csv(d, OK_ROW)
    p.write_bytes(p.read_bytes() + "images/ok.png,Couleur?,rouge\xe9\n".encode("latin-1"))
    return _config(d), f"{p}:3", "not UTF-8 text (byte 0xe9 at byte offset"


@case("csv_utf16_without_bom")
def _(d):
    p = d / "train.csv"
    p.write_bytes(f"url,instruction,response\n{OK_ROW}\n".encode("utf-16-le"))
    return _config(d), f"{p}:1", "NUL characters in the text: UTF-16 without a byte-order mark"


@case("csv_unclosed_quote")
def _(d):
    p = _csv(d, OK_ROW, 'images/ok.png,"What color?,red', OK_ROW)
    return _config(d), f"{p}:3", "not valid CSV (unexpected end of data)"


@case("jsonl_not_utf8")
def _(d):
    p = _jsonl(d, _ok_rec())
    p.write_bytes(p.read_bytes() + (json.dumps(_ok_rec(text="<image>Couleur?", answer="rouge\xe9"), ensure_ascii=False) + "\n").encode("latin-1"))
    return _config(d, {"train_csv": None, "train_jsonl": str(p)}), f"{p}:2", "not UTF-8 text (byte 0xe9 at byte offset"


@case("config_out_of_range")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, training={"learning_rate": -1e-4})
    return cfg, f"{cfg}: training.learning_rate", "-0.0001 is out of range: must be > 0"


@case("config_variant_out_of_range")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, lora_variants=[{"name": "a"}, {"name": "b", "training": {"warmup_ratio": 2}}])
    return cfg, f"{cfg}: lora_variants.b.training.warmup_ratio", "must be in [0, 1]"


@case("config_unknown_scheduler")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, training={"lr_scheduler_type": "cosin"})
    return cfg, f"{cfg}: training.lr_scheduler_type", "did you mean 'cosine'"


@case("config_pixel_bounds_unordered")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, models=[{"name": "m", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 784}])
    return cfg, f"{cfg}: models[0].max_pixels", "784 is less than min_pixels (3136)"


@case("csv_no_rows")
def _(d):
    p = _csv(d)
    return _config(d), f"{p}", "no samples"


@case("image_missing")
def _(d):
    _csv(d, OK_ROW, "images/gone.png,What color?,red")
    return _config(d), f"{d / 'train.csv'}:3: url", "not found"


@case("image_escapes_root")
def _(d):
    outside = d.parent / f"{d.name}-outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    _csv(d, OK_ROW, f"../{outside.name},What color?,red")
    return _config(d), f"{d / 'train.csv'}:3: url", "outside its root"


@case("image_absolute_outside_root")
def _(d):
    outside = d.parent / f"{d.name}-abs.png"
    Image.new("RGB", (8, 8)).save(outside)
    _csv(d, OK_ROW, f"{outside},What color?,red")
    return _config(d), f"{d / 'train.csv'}:3: url", "outside its root"


@case("image_remote_not_allowed")
def _(d):
    _csv(d, OK_ROW, "https://example.com/cat.png,What color?,red")
    return _config(d), f"{d / 'train.csv'}:3: url", "allow_remote_images"


CASES["image_not_an_image"] = _image_case(lambda p: p.write_text("hello"), "text.png")
CASES["image_empty_file"] = _image_case(lambda p: p.write_bytes(b""), "empty.png")
CASES["image_decompression_bomb"] = _image_case(lambda p: p.write_bytes(_png_header(20000, 20000)), "bomb.png")
CASES["image_over_pixel_limit"] = _image_case(lambda p: p.write_bytes(_png_header(12000, 9000)), "big.png")
CASES["image_absurd_aspect"] = _image_case(lambda p: Image.new("RGB", (1, 300)).save(p), "thin.png")
CASES["image_unsupported_format"] = _image_case(lambda p: Image.new("RGB", (8, 8)).save(p, format="PPM"), "x.png")
CASES["image_zero_size"] = _image_case(lambda p: p.write_bytes(_png_header(0, 10)), "zero.png")


@case("image_over_configured_pixel_cap")
def _(d):
    Image.new("RGB", (57, 56)).save(d / "images" / "wide.png")  # 3192 pixels; ok.png is 56x56 = 3136, at the cap
    _csv(d, OK_ROW, "images/wide.png,What color?,red")
    return _config(d, {"max_image_pixels": 3136}), f"{d / 'train.csv'}:3: url", "more than data.max_image_pixels (3,136)"


@case("config_pixel_cap_out_of_range")
def _(d):
    _csv(d, OK_ROW)
    cfg = _config(d, {"max_image_pixels": 0})
    return cfg, f"{cfg}: data.max_image_pixels", "0 is out of range"


@case("jsonl_not_json")
def _(d):
    _jsonl(d, _ok_rec(), "{not json")
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "not valid JSON"


@case("jsonl_not_an_object")
def _(d):
    _jsonl(d, _ok_rec(), "[1, 2]")
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "must be an object"


@case("jsonl_no_messages")
def _(d):
    _jsonl(d, _ok_rec(), {"text": "hi", "images": ["images/ok.png"]})
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "no 'messages' or 'conversations'"


@case("jsonl_no_assistant_turn")
def _(d):
    _jsonl(d, _ok_rec(), {"messages": [{"role": "user", "content": "<image>hi"}], "images": ["images/ok.png"]})
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "no assistant turn"


@case("jsonl_more_placeholders_than_images")
def _(d):
    _jsonl(d, _ok_rec(), _ok_rec(text="<image><image>Compare"))
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "2 image placeholders but 1 images"


@case("jsonl_fewer_placeholders_than_images")
def _(d):
    _jsonl(d, _ok_rec(), _ok_rec(images=("images/ok.png", "images/ok.png")))
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "1 image placeholders but 2 images"


@case("jsonl_unknown_role")
def _(d):
    _jsonl(d, _ok_rec(), {"messages": [{"role": "robot", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], "images": ["images/ok.png"]})
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2: messages[0].role", "unknown role"


@case("jsonl_empty_answer")
def _(d):
    _jsonl(d, _ok_rec(), _ok_rec(answer="  "))
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2", "assistant turn is empty"


@case("jsonl_image_in_answer")
def _(d):
    _jsonl(d, _ok_rec(), _ok_rec(answer="<image>red", images=("images/ok.png", "images/ok.png")))
    return _config(d, {"train_csv": None, "train_jsonl": str(d / "train.jsonl")}), f"{d / 'train.jsonl'}:2: messages[1].content", "assistant turn contains an image"


@case("eval_answers_not_strings")
def _(d):
    _csv(d, OK_ROW)
    _csv(d, "images/ok.png,How many?,\"[1, 2]\"", header="url,query,annotation", name="test.csv")
    return _config(d, {"test_csv": str(d / "test.csv")}), f"{d / 'test.csv'}:2: annotation", "non-empty strings"


TRUNCATED = "image_truncated"
CASES[TRUNCATED] = _image_case(_truncated, "cut.png")  # header is fine: only a full decode (check) finds it


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_reports_one_line_with_file_line_and_field(name, tmp_path, capsys):
    d = tmp_path / "w"
    _base(d)
    cfg, where, text = CASES[name](d)
    assert main(["check", str(cfg), "--no-tokens"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    lines = [l for l in out.out.splitlines() if l.startswith(where)]
    assert len(lines) == 1, f"expected one line starting {where!r} in:\n{out.out}"
    assert text in lines[0] and " — " in lines[0], lines[0]
    assert out.out.splitlines()[-1].startswith("1 error,")


@pytest.mark.parametrize("name", sorted(n for n in CASES if n != TRUNCATED))
def test_train_refuses_before_anything_is_written(name, tmp_path, capsys):
    d = tmp_path / "w"
    _base(d)
    cfg, where, text = CASES[name](d)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where}") and text in err[0], err
    assert not (d / "out").exists(), "a run directory was created for input that was refused"


def test_skip_policy_trains_without_the_bad_samples_and_counts_them(tmp_path, caplog):
    d = tmp_path / "w"
    _base(d)
    _csv(d, OK_ROW, OK_ROW, "images/gone.png,What color?,red", "images/ok.png,What color?,")
    cfg = _config(d, {"on_bad_sample": "skip"}, evaluation={"enabled": False})
    assert main(["train", str(cfg)]) == 0
    metrics = json.loads((d / "out" / "m__lora_r16" / "metrics.json").read_text())
    assert metrics["skipped_bad_samples"] == {"train": 2} and metrics["n_train_samples"] == 2
    assert "skipping a bad sample" in caplog.text and "gone.png" in caplog.text


@pytest.mark.parametrize("model, lora, message", [
    ({"hf_model_id": str(Path("/nonexistent/model"))}, None, "is not a loadable model directory|not found locally"),
    ({"hf_model_id": "tiny:nosuchfamily"}, None, "no tiny model for family"),
    ({"hf_model_id": "tiny:qwen2_5_vl", "model_type": "llava"}, None, "does not match the checkpoint"),
    ({"hf_model_id": "tiny:qwen2_5_vl", "model_type": "mystery"}, None, "unknown model_type"),
    ({"hf_model_id": "tiny:qwen2_5_vl"}, {"name": "v", "target_modules": ["q_projj"]}, "matches no linear module"),
])
def test_model_errors_are_one_line_and_leave_no_run_dir(tmp_path, capsys, model, lora, message):
    import re

    d = tmp_path / "w"
    _base(d)
    _csv(d, OK_ROW)
    cfg = _config(d, models=[{"name": "m", "min_pixels": 3136, "max_pixels": 3136, **model}], **({"lora_variants": [lora]} if lora else {}))
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (d / "out").exists()


@pytest.mark.parametrize("bom, encoding, eol", [(b"\xef\xbb\xbf", "utf-8", "\r\n"), (b"\xff\xfe", "utf-16-le", "\n"), (b"\xfe\xff", "utf-16-be", "\r\n")],
                         ids=["excel_utf8_bom_crlf", "utf16_le", "utf16_be"])
def test_text_saved_by_other_tools_passes_check(tmp_path, capsys, bom, encoding, eol):
    """Excel's "CSV UTF-8" (byte-order mark + CRLF) and UTF-16 with a byte-order mark, CSV and
    JSONL: no errors, every row read (the same samples as UTF-8: tests/test_data.py)."""
    d = tmp_path / "w"
    _base(d)
    text = "\n".join(["url,instruction,response", OK_ROW, 'images/ok.png,"What color\nexactly?",red']) + "\n"
    (d / "train.csv").write_bytes(bom + text.replace("\n", eol).encode(encoding))
    (d / "test.jsonl").write_bytes(bom + "".join(json.dumps(_ok_rec()) + eol for _ in range(3)).encode(encoding))
    assert main(["check", str(_config(d, {"test_jsonl": str(d / "test.jsonl")})), "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert "data: train: 2 samples, test: 3 samples" in out and out.rstrip().endswith("0 errors, 0 warnings"), out


@pytest.mark.parametrize("policy, code, prefix", [("error", 1, ""), ("skip", 0, "warning: ")])
def test_check_says_when_image_tokens_alone_fill_max_length(tmp_path, capsys, policy, code, prefix):
    """56x56 images at min/max_pixels 3136 are 4 image tokens: max_length 4 leaves no room for
    text (a check of the token count, which needs the processor, not of the config)."""
    d = tmp_path / "w"
    _base(d)
    _csv(d, OK_ROW, OK_ROW)
    cfg = _config(d, {"max_length": 4, "on_overlength": policy})
    assert main(["check", str(cfg)]) == code
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"{prefix}data.max_length:")]
    assert len(lines) == 1 and "4 leaves no room for text: the image tokens alone reach it in " in lines[0], lines
    assert f"{d / 'train.csv'}:2 and 1 more sample (up to 4 image tokens with m)" in lines[0] and "raise data.max_length above 4" in lines[0]

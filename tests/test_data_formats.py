"""Data in every shape users have (issue #16 item 1): the same three samples written as LLaVA
JSON/JSONL, LLaMA-Factory/ShareGPT `messages` and `conversations`, TRL typed parts, OpenAI
`image_url` parts (local paths and data: URIs), Parquet with image bytes, Arrow / save_to_disk
with `datasets.Image`, and CSV where it can express them -- and `vlmtune preview` shows the
same model inputs and supervised tokens for every one. Plus the one-line errors of each."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_config
from vlmtune.cli import load_cli_config, main, preview_samples
from vlmtune.errors import UserError

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}

# The three samples, in vlmtune's own terms: one single-turn, one multi-turn, one with two
# images whose placeholders stand inside the text.
S1 = ("red", "What color is the shape?", "red")
S2_TURNS = [("user", "What color is it?"), ("assistant", "blue"), ("user", "Are you sure?"), ("assistant", "yes, blue")]
S3_TEXT = ("Left: ", " right: ", " Which one is green?")
S3_ANSWER = "the right one"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    (d / "img").mkdir()
    for name, rgb in COLORS.items():
        im = Image.new("RGB", (56, 56), (255, 255, 255))
        im.paste(rgb, (8, 8, 48, 48))
        im.save(d / "img" / f"{name}.png")
    return d


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its Arrow cache under the test's tmp folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _png(folder: Path, color: str) -> bytes:
    return (folder / "img" / f"{color}.png").read_bytes()


# --- the three samples in each record shape -----------------------------------------------

def llava(folder):
    return [
        {"id": "s1", "image": "img/red.png", "conversations": [{"from": "human", "value": f"<image>\n{S1[1]}"}, {"from": "gpt", "value": S1[2]}]},
        {"id": "s2", "image": "img/blue.png", "conversations": [
            {"from": "human" if r == "user" else "gpt", "value": ("<image>\n" if i == 0 else "") + t} for i, (r, t) in enumerate(S2_TURNS)]},
        {"id": "s3", "image": ["img/red.png", "img/green.png"], "conversations": [
            {"from": "human", "value": f"{S3_TEXT[0]}<image>{S3_TEXT[1]}<image>{S3_TEXT[2]}"}, {"from": "gpt", "value": S3_ANSWER}]},
    ]


def sharegpt_messages(folder):
    """LLaMA-Factory's ShareGPT layout with OpenAI role tags: messages + images, <image> placeholders."""
    return [
        {"messages": [{"role": "user", "content": f"<image>{S1[1]}"}, {"role": "assistant", "content": S1[2]}], "images": ["img/red.png"]},
        {"messages": [{"role": r, "content": ("<image>" if i == 0 else "") + t} for i, (r, t) in enumerate(S2_TURNS)], "images": ["img/blue.png"]},
        {"messages": [{"role": "user", "content": f"{S3_TEXT[0]}<image>{S3_TEXT[1]}<image>{S3_TEXT[2]}"}, {"role": "assistant", "content": S3_ANSWER}],
         "images": ["img/red.png", "img/green.png"]},
    ]


def sharegpt_conversations(folder):
    """LLaMA-Factory's ShareGPT layout: conversations (from/value) + images."""
    return [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in r["messages"]], "images": r["images"]}
            for r in sharegpt_messages(folder)]


def _typed(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


def trl(folder):
    """TRL / HF chat: typed content parts, images listed beside."""
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, *_typed(S1[1])]}, {"role": "assistant", "content": _typed(S1[2])}], "images": ["img/red.png"]},
        {"messages": [{"role": r, "content": ([{"type": "image"}] if i == 0 else []) + _typed(t)} for i, (r, t) in enumerate(S2_TURNS)],
         "images": ["img/blue.png"]},
        {"messages": [{"role": "user", "content": [*_typed(S3_TEXT[0]), {"type": "image"}, *_typed(S3_TEXT[1]), {"type": "image"}, *_typed(S3_TEXT[2])]},
                      {"role": "assistant", "content": _typed(S3_ANSWER)}], "images": ["img/red.png", "img/green.png"]},
    ]


def openai(folder, data_uri: bool):
    """OpenAI-style content parts: each image an image_url part (a local path or a data: URI)."""
    def url(color):
        return f"data:image/png;base64,{base64.b64encode(_png(folder, color)).decode()}" if data_uri else f"img/{color}.png"

    def img(color):
        return {"type": "image_url", "image_url": {"url": url(color)}}

    return [
        {"messages": [{"role": "user", "content": [img("red"), *_typed(S1[1])]}, {"role": "assistant", "content": S1[2]}]},
        {"messages": [{"role": r, "content": ([img("blue")] if i == 0 else []) + _typed(t)} for i, (r, t) in enumerate(S2_TURNS)]},
        {"messages": [{"role": "user", "content": [*_typed(S3_TEXT[0]), img("red"), *_typed(S3_TEXT[1]), img("green"), *_typed(S3_TEXT[2])]},
                      {"role": "assistant", "content": S3_ANSWER}]},
    ]


def _write_json(path: Path, records, lines: bool) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records, indent=2), encoding="utf-8")
    return path


def _write_parquet(folder: Path, path: Path) -> Path:
    """ShareGPT records as a Parquet table with raw image bytes, under other column names
    (mapped back by data.columns)."""
    from datasets import Dataset

    recs = sharegpt_messages(folder)
    rows = {"dialog": [r["messages"] for r in recs],
            "pictures": [[(folder / p).read_bytes() for p in r["images"]] for r in recs]}
    Dataset.from_dict(rows).to_parquet(str(path))
    return path


def _write_saved(folder: Path, path: Path) -> Path:
    """TRL records as a `datasets` save_to_disk folder: images a List(datasets.Image()) column."""
    from datasets import Dataset, Features, Image as HFImage, List, Value

    recs = trl(folder)
    part = {"type": Value("string"), "text": Value("string")}
    feats = Features({"messages": List({"role": Value("string"), "content": List(part)}), "images": List(HFImage())})
    rows = {"messages": [r["messages"] for r in recs],
            "images": [[{"bytes": (folder / p).read_bytes(), "path": Path(p).name} for p in r["images"]] for r in recs]}
    Dataset.from_dict(rows, features=feats).save_to_disk(str(path))
    return path


def _write_csv(folder: Path, path: Path) -> Path:
    path.write_text(f"url,instruction,response\nimg/{S1[0]}.png,{S1[1]},{S1[2]}\n", encoding="utf-8")
    return path


def _write_flat_parquet(folder: Path, path: Path) -> Path:
    """The CSV shape as a table: image bytes + instruction + response."""
    from datasets import Dataset

    Dataset.from_dict({"image": [_png(folder, S1[0])], "instruction": [S1[1]], "response": [S1[2]]}).to_parquet(str(path))
    return path


# name -> (data keys, how many of the three samples the format can express)
def _formats(folder: Path) -> dict[str, tuple[dict, int]]:
    d = folder
    return {
        "trl.jsonl": ({"train_file": str(_write_json(d / "trl.jsonl", trl(d), True))}, 3),
        "trl.json": ({"train_file": str(_write_json(d / "trl.json", trl(d), False))}, 3),
        "llava.json": ({"train_file": str(_write_json(d / "llava.json", llava(d), False))}, 3),
        "llava.jsonl": ({"train_file": str(_write_json(d / "llava.jsonl", llava(d), True))}, 3),
        "sharegpt_messages.json": ({"train_file": str(_write_json(d / "sg_messages.json", sharegpt_messages(d), False))}, 3),
        "sharegpt_messages.jsonl": ({"train_file": str(_write_json(d / "sg_messages.jsonl", sharegpt_messages(d), True))}, 3),
        "sharegpt_conversations.json": ({"train_file": str(_write_json(d / "sg_conv.json", sharegpt_conversations(d), False))}, 3),
        "sharegpt_conversations.jsonl": ({"train_file": str(_write_json(d / "sg_conv.jsonl", sharegpt_conversations(d), True))}, 3),
        "openai_paths.jsonl": ({"train_file": str(_write_json(d / "oa_paths.jsonl", openai(d, False), True))}, 3),
        "openai_data_uri.json": ({"train_file": str(_write_json(d / "oa_uri.json", openai(d, True), False))}, 3),
        "legacy_train_jsonl_key.json": ({"train_jsonl": str(d / "llava.json")}, 3),
        "parquet_bytes": ({"train_file": str(_write_parquet(d, d / "sg.parquet")), "columns": {"messages": "dialog", "images": "pictures"}}, 3),
        "save_to_disk": ({"train_file": str(_write_saved(d, d / "saved"))}, 3),
        "arrow_file": ({"train_file": str(d / "saved" / "data-00000-of-00001.arrow")}, 3),
        "format_override": ({"train_file": str(_write_json(d / "trl.data", trl(d), True)), "format": "jsonl"}, 3),
        "csv": ({"train_file": str(_write_csv(d, d / "s1.csv"))}, 1),
        "legacy_train_csv_key": ({"train_csv": str(d / "s1.csv")}, 1),
        "parquet_flat": ({"train_file": str(_write_flat_parquet(d, d / "flat.parquet"))}, 1),
    }


def _config(tmp_path: Path, data: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out", data={"train_csv": None, "val_csv": None, "test_csv": None, **data})


def _differing(a: dict, b: dict) -> list[str]:
    """The model inputs (input_ids, labels, pixel_values, ...) that differ between two samples."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]


def test_every_format_previews_the_same_model_inputs(folder, tmp_path):
    formats = _formats(folder)
    seen: dict[str, list] = {}
    for name, (data, n) in formats.items():
        cfg = load_cli_config(str(_config(tmp_path / name, data)))
        seen[name] = preview_samples(cfg, "train", 3)
        assert len(seen[name]) == n, name
    ref = seen["trl.jsonl"]
    rows = [r for r, _ in ref]
    # What the three samples must be: every assistant turn supervised, images in place.
    assert [r["supervised_segments"] for r in rows] == [["red<|im_end|>"], ["blue<|im_end|>", "yes, blue<|im_end|>"], [f"{S3_ANSWER}<|im_end|>"]]
    s3 = rows[2]["text"]
    assert s3.index(S3_TEXT[0]) < s3.index("<|image_pad|>") < s3.index(S3_TEXT[1].strip()) < s3.rindex("<|image_pad|>") < s3.index(S3_TEXT[2].strip())
    assert rows[2]["n_image_tokens"] == 2 * rows[0]["n_image_tokens"] > 0
    for name, got in seen.items():
        for i, ((row, enc), (want_row, want_enc)) in enumerate(zip(got, ref)):
            assert {k: v for k, v in row.items() if k != "id"} == {k: v for k, v in want_row.items() if k != "id"}, (name, i)
            assert not _differing(enc.features, want_enc.features), (name, i, _differing(enc.features, want_enc.features))
    # The same inputs from different images would differ: the comparison can fail.
    assert not torch.equal(ref[0][1].features["pixel_values"], ref[1][1].features["pixel_values"])


def test_table_and_array_rows_are_named_by_index(folder, tmp_path):
    from vlmtune.data.check import load_checked_splits

    cfg = load_cli_config(str(_config(tmp_path, {"train_file": str(_write_saved(folder, tmp_path / "saved"))})))
    splits, report = load_checked_splits(cfg, full_decode=True)
    assert not report.errors and [s.origin for s in splits["train"]] == [f"{tmp_path / 'saved'}:row {i}" for i in (1, 2, 3)]
    assert splits["train"][2].image_fields == ["images[0]", "images[1]"]


# --- one line per problem: file, row, field, what, how to fix --------------------------------

def _check(tmp_path, capsys, data: dict) -> list[str]:
    """`vlmtune check` on a config with `data`: its exit status must say failure; returns the
    error lines (one per problem)."""
    rc = main(["check", str(_config(tmp_path, data)), "--no-tokens", "--fast"])
    out = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out.out + out.err
    return [line for line in out.out.splitlines() if " — " in line]


def _one_line(lines: list[str], *words: str) -> str:
    hits = [line for line in lines if all(w in line for w in words)]
    assert len(hits) == 1, (words, lines)
    return hits[0]


def test_placeholder_count_mismatch_names_file_row_and_field(folder, tmp_path, capsys):
    recs = llava(folder)
    recs[1]["conversations"][0]["value"] = "<image><image>\nWhat color is it?"
    p = _write_json(tmp_path / "llava.json", recs, False)
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p), "image_root": str(folder)}), "2 image placeholders but 1 images")
    assert line.startswith(f"{p}:row 2: image: ") and "make every <image> placeholder" in line


def test_json_file_that_is_not_an_array_of_records(folder, tmp_path, capsys):
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": llava(folder)}, indent=2))
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p)}), "not an array of records")
    assert line.startswith(f"{p}: not an array of records: the file holds an object with keys data — ") and ".jsonl" in line
    p.write_text(json.dumps([llava(folder)[0], 5, "x"]))
    lines = _check(tmp_path, capsys, {"train_file": str(p), "image_root": str(folder)})
    assert _one_line(lines, ":row 2:").startswith(f"{p}:row 2: a record must be an object, not a number — ")
    assert _one_line(lines, ":row 3:").startswith(f"{p}:row 3: a record must be an object, not a string — ")
    p.write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    assert _one_line(_check(tmp_path, capsys, {"train_file": str(p)}), "not valid JSON").startswith(f"{p}:3: not valid JSON (")


def test_unknown_format(folder, tmp_path, capsys):
    p = _write_json(tmp_path / "d.jsonl", trl(folder), True)
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p), "format": "xml"}), "data.format")
    assert "'xml' is not one of 'csv', 'jsonl', 'json', 'parquet', 'arrow', 'hf'" in line
    odd = tmp_path / "d.xml"
    odd.write_text("<records/>")
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(odd)}), "cannot tell the format")
    assert line.startswith("data.train_file: cannot tell the format of") and "set data.format to one of csv, jsonl, json, parquet, arrow, hf" in line


def test_train_csv_and_train_file_together(folder, tmp_path, capsys):
    line = _one_line(_check(tmp_path, capsys, {"train_csv": str(_write_csv(folder, tmp_path / "a.csv")), "train_file": str(tmp_path / "a.csv")}), "both")
    assert "data.train_file: both train_csv and train_file are set — keep one of them" in line


def test_parquet_missing_the_mapped_column(folder, tmp_path, capsys):
    p = _write_parquet(folder, tmp_path / "sg.parquet")
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p), "columns": {"messages": "dialog", "images": "photos"}}), "photos")
    assert line == f"{p}: no column 'photos', which data.columns.images names (columns: dialog, pictures) — set data.columns.images to one of the columns"
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p)}), "no messages or conversations column")
    assert line.startswith(f"{p}: ") and "data.columns" in line


def test_remote_image_url_needs_allow_remote_images(folder, tmp_path, capsys):
    recs = openai(folder, False)
    recs[0]["messages"][0]["content"][0]["image_url"]["url"] = "http://example.invalid/red.png"
    p = _write_json(tmp_path / "oa.jsonl", recs, True)
    line = _one_line(_check(tmp_path, capsys, {"train_file": str(p), "image_root": str(folder)}), "remote image")
    assert line.startswith(f"{p}:1: messages[0].content[0].image_url: remote image") and "data.allow_remote_images: true" in line


def test_hub_ids_go_through_load_dataset_and_pick_each_split(folder, tmp_path, monkeypatch):
    """A hub id reaches the real `load_dataset(id, name)` (replaced here: no network in tests);
    train/val/test take their split, data.splits overrides, and a local save stays a path."""
    import datasets

    saved = datasets.load_from_disk(str(_write_saved(folder, tmp_path / "saved")))
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({"train": saved, "validation": saved.select([0]), "dev2": saved.select([1, 2])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from vlmtune.data.sources import load_split

    cfg = load_cli_config(str(_config(tmp_path, {"train_file": "someone/shapes", "val_file": "someone/shapes", "hf_config_name": "small",
                                                 "image_root": str(folder)})))
    assert cfg.with_absolute_paths().data.train_file == "someone/shapes"  # not made a path
    assert [s.origin for s in load_split(cfg, "val")] == ["someone/shapes[validation]:row 1"] and calls[-1] == ("someone/shapes", "small")
    assert len(load_split(cfg, "train")) == 3
    cfg.data.splits = {"val": "dev2"}
    assert len(load_split(cfg, "val")) == 2
    cfg.data.splits = {"val": "nope"}
    with pytest.raises(UserError) as e:
        load_split(cfg, "val")
    assert e.value.line() == "someone/shapes: split: no split 'nope' for data.val_file (splits: train, validation, dev2) — set data.splits.val to one of train, validation, dev2"


def test_a_folder_of_parquet_files_reads_with_format_hf(folder, tmp_path):
    (tmp_path / "pq").mkdir()
    _write_parquet(folder, tmp_path / "pq" / "train.parquet")
    cfg = load_cli_config(str(_config(tmp_path, {"train_file": str(tmp_path / "pq"), "format": "hf", "columns": {"messages": "dialog", "images": "pictures"}})))
    [(row, _)] = preview_samples(cfg, "train", 1)
    assert row["id"] == "pq[train]:row 1" and row["supervised_segments"] == ["red<|im_end|>"]
    assert cfg.with_absolute_paths().data.train_file == str(tmp_path / "pq")

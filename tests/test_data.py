"""Data sources: CSV (train and evaluation columns) and JSONL (messages / conversations /
typed parts), image path resolution, and one-line errors that point at file and row."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlmtune.config import DataConfig
from vlmtune.data.sources import ImageResolver, read_csv, read_jsonl
from vlmtune.errors import UserError


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "img" / "b.png")
    return tmp_path


def _csv(path, rows):
    path.write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_csv_train_and_eval_columns(folder):
    d = DataConfig()
    p = _csv(folder / "train.csv", [("url", "instruction", "response"), ("img/a.png", "What color?", "red")])
    [s] = read_csv(p, d, ImageResolver(p, None, None))
    assert s.images == [str(folder / "img" / "a.png")]
    assert s.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What color?"}]
    assert s.response == "red" and s.id == "train.csv:2"
    q = _csv(folder / "test.csv", [("url", "query", "annotation"), ("img/b.png", "Color?", "blue")])
    [t] = read_csv(q, d, ImageResolver(q, None, None))
    assert (t.query, t.response) == ("Color?", "blue")


def test_csv_errors_point_at_file_row_and_field(folder):
    d = DataConfig()
    p = _csv(folder / "bad.csv", [("url", "instruction", "response"), ("img/a.png", "Q", "red"), ("img/a.png", "Q", " ")])
    with pytest.raises(UserError) as e:
        read_csv(p, d, ImageResolver(p, None, None))
    assert f"{p}:3: response: empty" in e.value.line()
    p = _csv(folder / "cols.csv", [("image", "instruction", "response"), ("img/a.png", "Q", "red")])
    with pytest.raises(UserError, match="no column 'url'.*data.image_column"):
        read_csv(p, d, ImageResolver(p, None, None))
    p = _csv(folder / "missing.csv", [("url", "instruction", "response"), ("img/nope.png", "Q", "red")])
    with pytest.raises(UserError, match=r"missing.csv:2: url: image 'img/nope.png' not found"):
        read_csv(p, d, ImageResolver(p, None, None))


def test_image_roots_image_root_then_data_folder_then_cwd(folder, tmp_path, monkeypatch):
    sub = folder / "sub"
    sub.mkdir()
    p = sub / "x.csv"
    # Not next to the data file: found through the working directory (the seed's habit).
    monkeypatch.chdir(folder)
    r = ImageResolver(p, None, None)
    assert r("img/a.png", "w") == os.path.join(str(folder), "img", "a.png") and r.used == {str(folder)}
    # data.image_root wins and is the only root.
    r2 = ImageResolver(p, str(folder / "img"), None)
    assert r2("a.png", "w") == str(folder / "img" / "a.png")
    with pytest.raises(UserError, match="not found"):
        r2("img/a.png", "w")


def test_jsonl_formats(folder):
    recs = [
        {"messages": [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}], "images": ["img/a.png"]},
        {"conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "blue"},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}], "image": "img/b.png"},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": "img/a.png"}, {"type": "image", "image": "img/b.png"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red then blue"}]}]},
        {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a square"}], "images": ["img/a.png"]},
    ]
    p = _jsonl(folder / "d.jsonl", recs)
    a, b, c, d = read_jsonl(p, DataConfig(), ImageResolver(p, None, None))
    assert a.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What color?"}] and a.response == "red"
    assert [m["role"] for m in b.messages] == ["user", "assistant", "user", "assistant"] and b.response == "yes"
    assert c.images == [str(folder / "img/a.png"), str(folder / "img/b.png")]
    assert [p["type"] for p in c.messages[1]["content"]] == ["text", "image", "image"]
    # No placeholder: the image goes first in the first user turn (LLaVA convention).
    assert d.messages[0]["content"][0] == {"type": "image"}


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"messages": [{"role": "user", "content": "<image><image>Q"}, {"role": "assistant", "content": "A"}], "images": ["img/a.png"]}', "2 image placeholders but 1 images"),
        ('{"messages": [{"role": "user", "content": "<image>Q"}], "images": ["img/a.png"]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "Q"}]}', "unknown role"),
        ('{"text": "hi"}', "no 'messages' or 'conversations'"),
        ('{"messages": [', "not valid JSON"),
        ('[1, 2]', "must be an object"),
    ],
)
def test_jsonl_errors_name_the_line(folder, line, words):
    p = folder / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["img/a.png"]}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        read_jsonl(p, DataConfig(), ImageResolver(p, None, None))
    assert f"{p}:2" in e.value.line() and words in e.value.line()


def test_non_utf8_csv_reports_byte_offset(folder):
    p = folder / "latin.csv"
    p.write_bytes(b"url,instruction,response\nimg/a.png,caf\xe9,red\n")
    with pytest.raises(UserError, match=r"latin.csv:2: not UTF-8 text \(byte offset 38\)"):
        read_csv(p, DataConfig(), ImageResolver(p, None, None))


def test_several_reference_answers_from_csv_and_jsonl(folder):
    import csv as _csv_mod

    d = DataConfig()
    p = folder / "eval.csv"
    with open(p, "w", newline="") as f:
        w = _csv_mod.writer(f)
        w.writerows([("url", "query", "annotation"), ("img/a.png", "How many?", '["two", "2"]'), ("img/b.png", "List?", "[not json]"),
                     ("img/b.png", "Bad?", "[1, 2]")])
    with pytest.raises(UserError) as e:
        read_csv(p, d, ImageResolver(p, None, None))
    assert e.value.line().startswith(f"{p}:4: annotation") and "non-empty strings" in e.value.line()
    rows = p.read_text().splitlines()[:3]
    p.write_text("\n".join(rows) + "\n")
    a, b = read_csv(p, d, ImageResolver(p, None, None))
    assert a.response == "two" and a.references == ["two", "2"]  # first answer is the training target
    assert b.references == ["[not json]"]  # looks like a list, is a literal answer
    j = _jsonl(folder / "e.jsonl", [{"messages": [{"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": "two"}],
                                      "images": ["img/a.png"], "references": ["2", "two", "a pair"]}])
    [s] = read_jsonl(j, d, ImageResolver(j, None, None))
    assert s.references == ["two", "2", "a pair"]

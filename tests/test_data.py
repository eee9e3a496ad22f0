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
    with pytest.raises(UserError, match=r"latin.csv:2: not UTF-8 text \(byte 0xe9 at byte offset 38\) — save the file as UTF-8"):
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


# --------------------------------------------------------------------------------------
# Text data as people have it: one decoder (sources.read_text) for every CSV/JSONL reader.

CSV_TEXT = 'url,instruction,response\nimg/a.png,"What color\nis it?",red\nimg/b.png,Color?,blue\n'
JSONL_TEXT = "".join(json.dumps(r) + "\n" for r in [
    {"messages": [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}], "images": ["img/a.png"]},
    {"conversations": [{"from": "human", "value": "<image>Color?"}, {"from": "gpt", "value": "blue"}], "image": "img/b.png"},
])
# name -> how a file's text is saved: (byte-order mark, encoding, line end)
SAVED_AS = {
    "utf8": (b"", "utf-8", "\n"),
    "excel_utf8_bom_crlf": (b"\xef\xbb\xbf", "utf-8", "\r\n"),
    "utf8_cr": (b"", "utf-8", "\r"),
    "utf16_le_bom": (b"\xff\xfe", "utf-16-le", "\r\n"),
    "utf16_be_bom": (b"\xfe\xff", "utf-16-be", "\n"),
}


def _save(path, text, how):
    bom, encoding, eol = SAVED_AS[how]
    path.write_bytes(bom + text.replace("\n", eol).encode(encoding))
    return path


def _as_loaded(samples):
    return [(s.id, s.messages, s.images) for s in samples]


@pytest.mark.parametrize("how", sorted(SAVED_AS))
def test_csv_in_any_common_encoding_loads_the_same_samples(folder, how):
    d = DataConfig()
    plain = _save(folder / "plain.csv", CSV_TEXT, "utf8")
    other = _save(folder / f"{how}.csv", CSV_TEXT, how)
    want = read_csv(plain, d, ImageResolver(plain, None, None))
    got = read_csv(other, d, ImageResolver(other, None, None))
    assert _as_loaded(got) == [(i.replace("plain", how), m, im) for i, m, im in _as_loaded(want)]
    # The quoted two-line instruction keeps its line break ('\n' whatever the file's line ends),
    # and the row after it is named by the line it starts on.
    assert got[0].query == "What color\nis it?" and [s.id for s in got] == [f"{how}.csv:2", f"{how}.csv:4"]


@pytest.mark.parametrize("how", sorted(SAVED_AS))
def test_jsonl_in_any_common_encoding_loads_the_same_samples(folder, how):
    d = DataConfig()
    plain = _save(folder / "plain.jsonl", JSONL_TEXT, "utf8")
    other = _save(folder / f"{how}.jsonl", JSONL_TEXT, how)
    want = read_jsonl(plain, d, ImageResolver(plain, None, None))
    got = read_jsonl(other, d, ImageResolver(other, None, None))
    assert _as_loaded(got) == [(i.replace("plain", how), m, im) for i, m, im in _as_loaded(want)]


def test_csv_row_numbers_stay_right_after_multi_line_cells(folder):
    p = folder / "multi.csv"
    p.write_text('url,instruction,response\n\nimg/a.png,"one\ntwo\nthree",red\nimg/b.png,Q,\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_csv(p, DataConfig(), ImageResolver(p, None, None))
    # lines: 1 header, 2 blank, 3-5 the three-line row, 6 the row with the empty response
    assert e.value.line().startswith(f"{p}:6: response: empty")


@pytest.mark.parametrize("name, data, where, words", [
    ("latin1.csv", "url,instruction,response\nimg/a.png,Q,red\nimg/b.png,caf\xe9,blue\n".encode("latin-1"), 3, "not UTF-8 text (byte 0xe9 at byte offset 54)"),
    ("latin1.jsonl", (JSONL_TEXT + JSONL_TEXT.replace("Color?", "Couleur\xe9?")).encode("latin-1"), 4, "not UTF-8 text (byte 0xe9 at byte offset"),
    ("after_multiline.csv", 'url,instruction,response\nimg/a.png,"Q\nQ",red\nimg/b.png,caf\xe9,blue\n'.encode("latin-1"), 4, "not UTF-8 text (byte 0xe9"),
    ("utf16_no_bom.csv", CSV_TEXT.encode("utf-16-le"), 1, "NUL characters in the text: UTF-16 without a byte-order mark"),
    ("utf16_no_bom.jsonl", JSONL_TEXT.encode("utf-16-be"), 1, "NUL characters in the text: UTF-16 without a byte-order mark"),
    ("utf16_cut.csv", b"\xff\xfe" + CSV_TEXT.encode("utf-16-le") + b"x", 5, "not UTF-16 text (byte 0x78"),  # an odd byte after the last line end
    ("unclosed_quote.csv", b'url,instruction,response\nimg/a.png,Q,red\nimg/b.png,"never closed,blue\nimg/a.png,Q,red\n', 3, "not valid CSV (unexpected end of data)"),
])
def test_undecodable_files_name_the_file_and_line_of_the_first_bad_byte(folder, name, data, where, words):
    p = folder / name
    p.write_bytes(data)
    reader = read_csv if name.endswith(".csv") else read_jsonl
    with pytest.raises(UserError) as e:
        reader(p, DataConfig(), ImageResolver(p, None, None), problems=[])  # a file-level error even when rows are collected
    line = e.value.line()
    assert line.startswith(f"{p}:{where}: {words}") and "\n" not in line, line
    assert "quote" in line if "CSV" in words else "save the file as UTF-8" in line

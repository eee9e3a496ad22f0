"""Atomic, durable writes: every JSON/YAML result is written to a temp file in the same
folder, fsynced, renamed into place, and the folder fsynced, so neither a kill nor a power cut
leaves a half-written result behind, and a result reported written survives a power cut."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)  # the temp file's directory entry, before the rename
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (created, renamed, removed files) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every folder bottom-up (`root` included): a folder
    written by a library (a checkpoint, `save_pretrained`) becomes durable before it is
    renamed into place or reported written."""
    root = Path(root)
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def remove_stale_temp_files(folder: str | os.PathLike) -> None:
    """Delete the temp files (`.<name>.<random>.tmp`) that `atomic_write_text` leaves when a
    process is killed between writing and renaming: they never held a finished result."""
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

"""A small synthetic VQA dataset: one coloured shape on a noisy background per image, with a
question about its colour or its shape and a one-word answer. Deterministic by seed.

Used by `vlmtune demo` and the tests; written as ordinary CSV + PNG files so it goes through
exactly the path a user's data takes.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "color": ("What color is the shape?", "What is the colour of the object?", "Which color do you see?"),
    "shape": ("What shape is this?", "Which shape is shown?"),
}


def draw(color: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A `size`x`size` RGB image: grey noise, one shape covering roughly half the side."""
    noise = np.random.default_rng(rng.randrange(2**32)).integers(90, 150, size=(size, size, 3), dtype=np.uint8)
    im = Image.fromarray(noise, "RGB")
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def make_dataset(out_dir: str | Path, n_train: int = 320, n_val: int = 32, n_test: int = 48, image_size: int = 56, seed: int = 0,
                 kinds: tuple[str, ...] = ("color", "shape")) -> dict[str, Path]:
    """Write images and `train.csv`/`val.csv` (url, instruction, response) and `test.csv`
    (url, query, annotation: seed 003's evaluation columns). Returns split -> CSV path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            kind = rng.choice(kinds)
            rel = f"images/{split}_{i:04d}.png"
            draw(color, shape, image_size, rng).save(out / rel)
            rows.append((rel, rng.choice(QUESTIONS[kind]), color if kind == "color" else shape))
        header = ("url", "query", "annotation") if split == "test" else ("url", "instruction", "response")
        p = out / f"{split}.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        paths[split] = p
    return paths

"""Time every metric that needs no Java on N synthetic caption-like samples.

    python bench/metrics_speed.py [--n 10000] [--refs 5] [--java]

Target (Evaluation issue): all of them together under 30 s for 10,000 samples on this CPU,
bootstrap intervals (1000 resamples) included. Predictions and references are random
10-20-word captions over a 300-word vocabulary (COCO-like lengths), a fifth of them in
Korean, with several references per sample.
"""

from __future__ import annotations

import argparse
import random
import time

from vlmtune.eval import metrics as M


def make(n: int, n_refs: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    en = [f"w{i}" for i in range(300)] + "a the red blue circle square on of dog cat sits big small".split()
    ko = ["고양이", "강아지", "빨간", "파란", "원", "사각형", "위에", "있다", "작은", "큰"]
    def cap() -> str:
        vocab = ko if rng.random() < 0.2 else en
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 20)))
    preds = [cap() for _ in range(n)]
    refs = [[cap() for _ in range(n_refs)] for _ in range(n)]
    return preds, refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--java", action="store_true", help="also time meteor, cider and coco (PTB tokenizer + METEOR jar)")
    args = ap.parse_args()
    preds, refs = make(args.n, args.refs)
    names = [n for n, m in M.METRICS.items() if not m.java]
    total = 0.0
    if args.java:
        t = time.perf_counter()
        M.compute(["meteor", "cider", "coco"], preds, refs)  # one PTB tokenization shared by the three
        print(f"{'meteor+cider+coco':<24} {time.perf_counter() - t:6.2f} s (Java; not in the 30 s target)")
    for name in names:
        t = time.perf_counter()
        M.compute([name], preds, refs)
        dt = time.perf_counter() - t
        total += dt
        print(f"{name:<24} {dt:6.2f} s")
    print(f"{'all non-Java metrics':<24} {total:6.2f} s for {args.n} samples x {args.refs} references (target < 30 s)")


if __name__ == "__main__":
    main()

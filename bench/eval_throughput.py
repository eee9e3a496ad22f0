"""Generation throughput: batch size 1 (seed 003's default) vs batched, same model, same data,
same run.

    python bench/eval_throughput.py [--n 192] [--batch-size 16] [--image-size 56] [--new-tokens 16] [--repeats 3]

Both arms run vlmtune's own `generate` (left-padded batches, images processed once per
sample) on `tiny:qwen2_5_vl` over the synthetic colour dataset -- by default the demo's
56x56 images (4 image tokens); `--image-size 224` is the seed's pixel bound (64 image tokens).
Every answer is forced to exactly `--new-tokens` tokens (min = max) so both arms generate the
same number of tokens and the ratio measures batching, not answer lengths. Each arm is timed
`--repeats` times and the median is kept. Prints samples/s for each and the ratio (target
>= 4x on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--family", default="qwen2_5_vl")
    args = ap.parse_args()

    from vlmtune.config import ModelConfig
    from vlmtune.data.collate import Encoder
    from vlmtune.data.sources import DataConfig, ImageResolver, read_csv
    from vlmtune.data.synthetic import make_dataset
    from vlmtune.eval.generate import GenerationSettings, generate
    from vlmtune.models.loading import load_model

    torch.manual_seed(0)
    data = Path(tempfile.mkdtemp(prefix="vlmtune-bench-"))
    make_dataset(data, n_train=1, n_val=1, n_test=args.n, image_size=args.image_size, seed=0, kinds=("color",))
    test = data / "test.csv"
    samples = read_csv(test, DataConfig(), ImageResolver(test, None, None))
    px = args.image_size * args.image_size
    lm = load_model(ModelConfig(name="bench", hf_model_id=f"tiny:{args.family}", torch_dtype="float32", min_pixels=px, max_pixels=px))
    enc = Encoder(lm.processor, lm.family)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    generate(lm.model, enc, samples[:2], 2, settings)  # warm-up (allocator, kernels)

    rates = {}
    for bs in (1, args.batch_size):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            recs = generate(lm.model, enc, samples, bs, settings)
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        assert all(r["n_generated_tokens"] == args.new_tokens for r in recs)
        rates[bs] = len(samples) / dt
        print(f"batch_size={bs:<3} {len(samples)} samples in {dt:6.2f} s = {rates[bs]:7.2f} samples/s "
              f"({recs[0]['n_prompt_tokens']} prompt tokens, {args.new_tokens} new tokens each)")
    print(f"ratio batched/bs1 = {rates[args.batch_size] / rates[1]:.2f}x (target >= 4x) on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()

"""The demo end to end: untrained model near zero, trained model near perfect, summary written,
every default metric with its interval, and `vlmtune evaluate --run` reproducing the result."""

from __future__ import annotations

import json

from vlmtune.cli import main
from vlmtune.eval.metrics import DEFAULT_METRICS


def test_demo_learns(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert line == f"exact_match before={s['exact_match_before']:.2f} after={s['exact_match_after']:.2f}"
    assert s["exact_match_before"] <= 0.10 and s["exact_match_after"] >= 0.90
    run = tmp_path / "demo" / "tiny_qwen2_5_vl__lora_r32"
    assert s["train_seconds"] > 0 and (run / "lora_adapter").is_dir()
    assert s["run_dir"].endswith("tiny_qwen2_5_vl__lora_r32")

    gm = json.loads((run / "generation_metrics.json").read_text())
    assert gm["n_samples"] == s["n_test"] and gm["bootstrap"]["resamples"] >= 1000
    for name in DEFAULT_METRICS:
        e = gm[name]
        assert e["value"] is not None and e["ci95"] is not None, name
        assert e["implementation"], name
    lo, hi = gm["exact_match"]["ci95"]
    assert lo <= gm["exact_match"]["value"] <= hi

    # `vlmtune check` on the demo's config: the length histogram, exit 0.
    capsys.readouterr()
    assert main(["check", str(tmp_path / "demo" / "demo_config.yaml")]) == 0
    report = capsys.readouterr().out
    assert "tokens per sample (tiny_qwen2_5_vl" in report and "0 over data.max_length" in report and report.rstrip().endswith("0 errors, 0 warnings")

    # The standalone evaluation of the finished run reproduces the demo's exact match.
    out = tmp_path / "again"
    assert main(["evaluate", "--run", str(run), "--csv", str(tmp_path / "demo" / "data" / "test.csv"),
                 "--output-dir", str(out), "--metrics", "exact_match"]) == 0
    again = json.loads((out / "generation_metrics.json").read_text())
    assert again["exact_match"]["value"] == s["exact_match_after"]

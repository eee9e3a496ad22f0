"""The demo end to end: untrained model near zero, trained model near perfect, summary written."""

from __future__ import annotations

import json

from vlmtune.cli import main


def test_demo_learns(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert line == f"exact_match before={s['exact_match_before']:.2f} after={s['exact_match_after']:.2f}"
    assert s["exact_match_before"] <= 0.10 and s["exact_match_after"] >= 0.90
    assert s["train_seconds"] > 0 and (tmp_path / "demo" / "tiny_qwen2_5_vl__lora_r32" / "lora_adapter").is_dir()
    assert s["run_dir"].endswith("tiny_qwen2_5_vl__lora_r32")

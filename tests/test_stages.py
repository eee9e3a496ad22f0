"""Staged training (seed 002): projector, then LLM with LoRA, then everything, in one
command. Per stage, exactly the parts that stage's plan trains change and the others stay
bit-identical; each stage has its own run tree; the run's top level holds the last stage's
outputs; a rerun skips finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_config
from vlmtune.cli import main
from vlmtune.models.loading import ModelConfig, load_model

RUN = "q__r8"
STAGES = [
    {"name": "projector", "training_mode": "projector", "max_steps": 2, "learning_rate": "1e-2"},
    {"name": "llm", "training_mode": "llm", "max_steps": 2, "parts": {"projector": {"train": "frozen"}}},
    {"name": "all", "training_mode": "both", "max_steps": 2, "learning_rate": "1e-4", "lora": {"r": 4, "alpha": 8}},
]
# What each stage's plan trains (stage 2 freezes the projector to show the plan is per stage:
# the projector is refused frozen, so stage 2 uses LoRA on it instead -- see the config below).
CHANGES = [{"projector"}, {"projector", "llm"}, {"projector", "llm", "vision"}]


def _weights(folder: Path) -> dict:
    """Parameters by their runtime names (the file keeps the hub layout's names)."""
    from transformers import AutoModelForImageTextToText

    return {k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(str(folder)).named_parameters()}


@pytest.fixture(scope="module")
def staged(shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staged")
    stages = [dict(s) for s in STAGES]
    stages[1]["parts"] = {"projector": {"train": "lora"}}
    cfg = write_config(tmp / "c.yaml", shapes_dir, tmp / "out",
                       training={"stages": stages, "save_steps": 1, "logging_steps": 1}, evaluation={"enabled": False})
    assert main(["train", str(cfg)]) == 0
    return cfg, tmp / "out" / RUN


def test_each_stage_changes_exactly_its_parts(staged):
    cfg, run = staged
    from vlmtune.models.tiny import tiny_dir

    base = Path(tiny_dir("tiny:qwen2_5_vl"))
    parts = load_model(ModelConfig(name="q", hf_model_id=str(base))).parts
    prev = _weights(base)
    assert {parts.part_of(k) for k in prev} == {"vision", "projector", "llm"}
    folders = [run / f"stage_{i}_{s['name']}" for i, s in enumerate(STAGES, start=1)]
    for folder, expect in zip(folders, CHANGES):
        assert (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()
        now = _weights(folder / "final")
        assert set(now) == set(prev)
        changed = {parts.part_of(k) for k in now if not (now[k] == prev[k]).all()}
        assert changed == expect, (folder.name, changed)
        prev = now
    # stage 3's LoRA rank is its own (r=4), stage 2's the variant's (r=8)
    assert json.loads((folders[1] / "lora_adapter" / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((folders[2] / "lora_adapter" / "adapter_config.json").read_text())["r"] == 4
    # the run's top level holds the last stage's outputs
    assert (run / "final" / "model.safetensors").read_bytes() == (folders[2] / "final" / "model.safetensors").read_bytes()
    assert (run / "lora_adapter" / "adapter_model.safetensors").read_bytes() == (folders[2] / "lora_adapter" / "adapter_model.safetensors").read_bytes()
    m = json.loads((run / "metrics.json").read_text())
    assert [s["name"] for s in m["stages"]] == ["projector", "llm", "all"] and all(s["global_step"] == 2 for s in m["stages"])


def test_rerun_skips_finished_stages(staged, caplog):
    cfg, run = staged
    before = {p: p.stat().st_mtime_ns for p in run.rglob("final/model.safetensors")}
    (run / "metrics.json").unlink()  # as if killed while publishing the last stage
    with caplog.at_level("INFO", logger="vlmtune"):
        assert main(["train", str(cfg)]) == 0
    assert sum("finished earlier, reused" in r.getMessage() for r in caplog.records) == 3
    for p, t in before.items():
        if "stage_" in str(p):
            assert p.stat().st_mtime_ns == t, p  # stages untouched
    assert (run / "metrics.json").is_file()


def test_staged_example_config_loads():
    from vlmtune.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "staged.yaml")
    assert [(s.name, s.training_mode) for s in cfg.training.stages] == [("projector", "projector"), ("instruct", "llm"), ("end_to_end", "both")]
    assert cfg.training.stages[2].lora == {"r": 32, "alpha": 64}

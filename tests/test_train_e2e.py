"""The real entry point on a tiny model: `vlmtune train CONFIG` writes the seed's run tree,
the adapter and merged model load with plain peft/transformers and generate what vlmtune
generated, a rerun resumes from the last checkpoint, and the quick form trains too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_config
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.data.collate import Encoder
from vlmtune.data.sources import load_split
from vlmtune.eval.generate import GenerationSettings, generate
from vlmtune.models.families import FAMILIES
from vlmtune.models.processors import image_only


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg_path = write_config(tmp / "c.yaml", shapes_dir, tmp / "out", training={"eval_strategy": "steps", "eval_steps": 2})
    assert main(["train", str(cfg_path)]) == 0
    return cfg_path, tmp / "out" / "q__r8"


def test_run_tree(trained):
    cfg_path, run = trained
    for rel in ("checkpoints", "lora_adapter/adapter_config.json", "lora_adapter/adapter_model.safetensors",
                "final/config.json", "final/model.safetensors", "metrics.json", "config.yaml",
                "parameter_report.json", "predictions.jsonl", "generation_metrics.json"):
        assert (run / rel).exists(), rel
    assert not list(run.rglob("*.tmp")) and not list(run.glob(".*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 4 and len(m["train_loss_history"]) == 4
    assert [e["step"] for e in m["eval_loss_history"]] == [2, 4] and m["final_eval_loss"] > 0
    rep = json.loads((run / "parameter_report.json").read_text())
    assert rep["total_parameters"] == sum(v["total"] for v in rep["parts"].values()) > 0
    assert rep["parts"]["vision"]["trainable"] == 0 and rep["parts"]["llm"]["trainable"] > 0  # default mode llm
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["models"][0]["name"] == "q" and saved["lora_variants"][0]["name"] == "r8"
    gm = json.loads((run / "generation_metrics.json").read_text())
    assert 0.0 <= gm["exact_match"]["value"] <= 1.0 and gm["n_samples"] == 8


def test_plain_peft_and_transformers_reproduce_vlmtune_generation(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg_path, run = trained
    cfg = load_config(cfg_path)
    samples = load_split(cfg, "test")
    ours = [json.loads(l)["prediction"] for l in (run / "predictions.jsonl").read_text().splitlines()]
    base_path = json.loads((run / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_dir()  # tiny: models point at their saved local directory

    proc_cls = image_only(FAMILIES["qwen2_5_vl"].processor_class())  # no torchvision here
    settings = GenerationSettings(max_new_tokens=4)
    for load in (
        lambda: PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_path), str(run / "lora_adapter")),
        lambda: AutoModelForImageTextToText.from_pretrained(str(run / "final")),
    ):
        model = load()
        proc = proc_cls.from_pretrained(str(run / "final"))
        proc.image_processor.size = {"shortest_edge": 3136, "longest_edge": 3136}
        preds = [r["prediction"] for r in generate(model, Encoder(proc, FAMILIES["qwen2_5_vl"]), samples, 4, settings)]
        assert preds == ours


def test_rerun_resumes_from_last_checkpoint(trained):
    cfg_path, run = trained
    assert main(["train", str(cfg_path), "--set", "training.max_steps=6"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"] and m["resumed_from"].endswith("checkpoint-4")
    assert m["global_step"] == 6


def test_quick_form_with_training_mode_env(shapes_dir, tmp_path, monkeypatch):
    lines = [json.dumps({"messages": [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}],
                         "images": [f"images/train_{i:04d}.png"]}) for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TRAINING_MODE", "vision")
    rc = main(["train", "--dataset", str(tmp_path / "d.jsonl"), "--model-id", "tiny:qwen2_5_vl", "--output-dir", str(tmp_path / "o"),
               "--set", "training.max_steps=1", "--set", f"data.image_root={shapes_dir}"])
    assert rc == 0
    rep = json.loads((tmp_path / "o" / "tiny_qwen2_5_vl__lora_r16" / "parameter_report.json").read_text())
    assert rep["plan"]["vision"]["train"] == "lora" and rep["plan"]["llm"]["train"] == "frozen"
    assert rep["parts"]["vision"]["trainable"] > 0 and rep["parts"]["llm"]["trainable"] == 0


def test_user_errors_are_one_line_without_traceback(shapes_dir, tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", training={"mixed_precision": "fp16"})
    r = subprocess.run([sys.executable, "-m", "vlmtune.cli", "train", str(cfg_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: training.mixed_precision: fp16 needs a CUDA GPU")
    bad = write_config(tmp_path / "b.yaml", shapes_dir, tmp_path / "out", training={"learning_rat": 1})
    r = subprocess.run([sys.executable, "-m", "vlmtune.cli", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "did you mean `learning_rate`?" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a config that does not load

"""`vlmtune inspect` and `vlmtune preview` through the real entry point, the shipped example
config and docs, and seed 000's newly-initialized-weights report and Xavier re-init."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_FAMILIES, write_config
from vlmtune.cli import main
from vlmtune.config import ModelConfig, VisualEncoderSettings, describe_keys, load_config
from vlmtune.models.loading import load_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_inspect_lists_parts_that_sum_to_the_total(family, capsys):
    assert main(["inspect", f"tiny:{family}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    parts = out["report"]["parts"]
    assert all(parts[p]["total"] > 0 for p in ("vision", "projector", "llm"))
    assert sum(v["total"] for v in parts.values()) == out["report"]["total_parameters"]
    model = load_model(ModelConfig(name="m", hf_model_id=f"tiny:{family}")).model
    assert out["report"]["total_parameters"] == sum(p.numel() for p in model.parameters())
    modes = out["modes"]
    assert modes["projector"]["trainable_parameters_lora_r16"]["llm"] == 0
    assert modes["projector"]["trainable_parameters_lora_r16"]["projector"] == parts["projector"]["total"]
    assert modes["both"]["trainable_parameters_lora_r16"]["vision"] > 0 and modes["llm"]["trainable_parameters_lora_r16"]["vision"] == 0


def test_preview_json_on_the_demo_config(tmp_path, capsys):
    from vlmtune.demo import demo_config
    from vlmtune.data.synthetic import make_dataset
    import yaml

    make_dataset(tmp_path / "data", n_train=5, n_val=2, n_test=2, image_size=56, kinds=("color",))
    (tmp_path / "demo_config.yaml").write_text(yaml.safe_dump(demo_config(tmp_path)))
    assert main(["preview", str(tmp_path / "demo_config.yaml"), "--n", "5", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    answers = [l.split(",")[-1] for l in (tmp_path / "data" / "train.csv").read_text().splitlines()[1:]]
    assert len(rows) == 5
    for row, ans in zip(rows, answers):
        assert set(row) >= {"text", "n_tokens", "n_image_tokens", "n_supervised_tokens", "supervised_text"}
        assert row["supervised_text"] == ans + "<|im_end|>"
        assert row["n_image_tokens"] == 4  # 56x56 -> 4x4 patches -> 2x2 after the merger


def test_example_config_and_docs_are_current():
    cfg = load_config(ROOT / "configs" / "vlm_ablation.yaml")
    assert [m.name for m in cfg.models] == ["qwen_vl_chat", "llava_1.5_7b"]
    assert (ROOT / "docs" / "config.md").read_text() == describe_keys() + "\n", "regenerate: python -m vlmtune.config > docs/config.md"
    grid = load_config(ROOT / "examples" / "demo_grid.yaml")
    assert [v.name for v in grid.variants()] == ["llm_r16", "both_r32"]
    assert grid.for_variant(grid.variants()[1]).training.training_mode == "both"


def _without_projector(tmp_path: Path) -> Path:
    src = Path(resolve_model_path("tiny:qwen2_5_vl"))
    dst = tmp_path / "partial"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".merger." not in k}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_newly_initialized_weights_are_reported_and_xavier_reinitialised(tmp_path, caplog):
    path = _without_projector(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        lm = load_model(ModelConfig(name="m", hf_model_id=str(path)), VisualEncoderSettings())
    assert lm.newly_initialized and all(".merger." in n for n in lm.newly_initialized)
    [msg] = [r.getMessage() for r in caplog.records if "newly initialized" in r.getMessage()]
    assert f"{len(lm.newly_initialized)} weights" in msg and "projector" in msg and "must be trained" in msg

    torch.manual_seed(0)
    plain = dict(load_model(ModelConfig(name="m", hf_model_id=str(path))).model.named_parameters())
    torch.manual_seed(0)
    lm2 = load_model(ModelConfig(name="m", hf_model_id=str(path)), VisualEncoderSettings(improve_initialization=True))
    params = dict(lm2.model.named_parameters())
    for n in lm2.newly_initialized:
        p = params[n]
        if p.dim() == 2:
            bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
            assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.5 * bound
            assert not torch.equal(p, plain[n])
        elif n.endswith("bias"):
            assert bool((p == 0).all())
    # Loaded weights are untouched by the re-init.
    assert torch.equal(params["model.visual.blocks.0.attn.qkv.weight"], plain["model.visual.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("flag, value, words", [
    ("--num-beams", "0", "--num-beams: 0 is out of range: must be >= 1 — use a value >= 1, e.g. 1 (the default)"),
    ("--top-p", "1.5", "--top-p: 1.5 is out of range: must be in (0, 1]"),
    ("--temperature", "0", "--temperature: 0.0 is out of range: must be > 0"),
    ("--batch-size", "0", "--batch-size: 0 is out of range: must be >= 1"),
    ("--limit", "0", "--limit: 0 is out of range: must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens: 0 is out of range: must be >= 1"),
])
def test_evaluate_flags_get_their_config_keys_range_before_anything_loads(tmp_path, capsys, flag, value, words):
    # The data file does not exist: an error about it would mean the flag went unchecked.
    assert main(["evaluate", "--model-id", "tiny:qwen2_5_vl", "--csv", str(tmp_path / "absent.csv"), flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {words}"), err

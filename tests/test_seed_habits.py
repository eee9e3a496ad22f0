"""Issue #16 item 6: users arrive with the seed documents' commands and configs (shared/spec.md),
and those work as written: the seed entry points, the quick form without --model-id, the seeds'
key spellings (with a one-line note each), seed 002's `projector_target_modules` (modules that
always train) and `suppress_init_warnings: false` through the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from test_cli import _without_projector
from vlmtune.cli import _setup_logging, build_parser, quick_config
from vlmtune.config import ModelConfig, VisualEncoderSettings, config_from_dict
from vlmtune.errors import UserError
from vlmtune.models.loading import load_model
from vlmtune.train.plan import plan_parts, resolve_trainables

ROOT = Path(__file__).resolve().parents[1]


def _raw(**extra):
    return {"data": {"train_csv": "x.csv"}, "models": [{"name": "q", "hf_model_id": "tiny:qwen2_5_vl"}], **extra}


def test_seed_spellings_map_to_vlmtune_keys_with_one_note_each(caplog):
    raw = _raw(use_lora=True, lora_rank=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], mixed_precision=True,
               load_in_4bit=True, gradient_checkpointing=True,
               model_settings={"vlm_training": {"visual_encoder_settings": {"suppress_init_warnings": False, "visual_learning_rate_multiplier": 0.05}}},
               training={"dataset_text_field": "", "dataset_kwargs": {"skip_prepare_dataset": True}})
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        cfg = config_from_dict(raw, "seed.json")
    [v] = cfg.variants()
    assert (v.name, v.r, v.alpha, v.llm_target_modules) == ("lora_r8", 8, 16, ["q_proj", "v_proj"])
    assert cfg.training.mixed_precision == "bf16" and cfg.training.gradient_checkpointing and cfg.models[0].load_in_4bit
    assert not cfg.visual_encoder_settings.suppress_init_warnings and cfg.visual_encoder_settings.visual_learning_rate_multiplier == 0.05
    notes = [r.getMessage() for r in caplog.records if "seed spelling" in r.getMessage()]
    for key in ("use_lora", "lora_rank", "lora_alpha", "lora_target_modules", "mixed_precision", "load_in_4bit", "gradient_checkpointing",
                "model_settings.vlm_training.visual_encoder_settings", "dataset_text_field", "dataset_kwargs"):
        assert sum(key in n for n in notes) == 1, key
    assert all(n.startswith("seed.json: ") for n in notes)
    assert any("dataset_kwargs has no effect" in n for n in notes)


def test_seed_spellings_use_lora_false_and_mixed_precision_false():
    cfg = config_from_dict(_raw(training={"use_lora": False, "mixed_precision": False}))
    assert cfg.training.parts["llm"].train == "full" and cfg.training.mixed_precision == "no"


def test_a_seed_spelling_that_contradicts_its_key_is_one_line():
    with pytest.raises(UserError) as e:
        config_from_dict(_raw(lora_rank=8, lora={"r": 16}), "c.yaml")
    assert "c.yaml: lora_rank" in str(e.value) and "lora.r" in str(e.value) and "\n" not in str(e.value)


def test_seed_entry_points_run(tmp_path, shapes_dir):
    """`python vlm_finetune_and_eval.py --config configs/vlm_ablation.yaml` (listed: its models
    need the hub) and `python scripts/vlm_evaluate.py --model-id ... --csv ...` (run)."""
    r = subprocess.run([sys.executable, "vlm_finetune_and_eval.py", "--config", "configs/vlm_ablation.yaml", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    for run in ("qwen_vl_chat__lora_r16", "qwen_vl_chat__lora_r32", "llava_1.5_7b__lora_r16", "llava_1.5_7b__lora_r32"):
        assert run in r.stdout
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "vlm_evaluate.py"), "--model-id", "tiny:qwen2_5_vl", "--csv", str(shapes_dir / "test.csv"),
                        "--output-dir", str(out), "--limit", "2", "--max-new-tokens", "2", "--min-pixels", "3136", "--max-pixels", "3136",
                        "--metrics", "exact_match"], cwd=tmp_path, capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "generation_metrics.json").read_text())["n_samples"] == 2


def test_quick_form_without_model_id_uses_the_documented_default(monkeypatch):
    args = build_parser().parse_args(["train", "--dataset", "d.jsonl"])
    monkeypatch.delenv("VLMTUNE_MODEL_ID", raising=False)
    monkeypatch.setenv("TRAINING_MODE", "both")
    cfg = quick_config(args)
    assert cfg.models[0].hf_model_id == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.training.training_mode == "both"
    args = build_parser().parse_args(["train", "--dataset", "d.jsonl"])
    monkeypatch.setenv("VLMTUNE_MODEL_ID", "tiny:llava")
    assert quick_config(args).models[0].hf_model_id == "tiny:llava"


def test_projector_target_modules_always_train_and_unknown_names_are_errors():
    cfg = config_from_dict(_raw(lora={"projector_target_modules": ["patch_embed"]}, training={"training_mode": "llm"}))
    lm = load_model(cfg.models[0], cfg.visual_encoder_settings)
    [v] = cfg.variants()
    res = resolve_trainables(lm.model, lm.parts, lm.family, plan_parts(cfg.training, cfg.visual_encoder_settings), v)
    assert res.plan["vision"].train == "frozen"  # llm mode: the vision part is frozen ...
    assert "model.visual.patch_embed" in res.modules_to_save  # ... but the named module trains
    names = [n for n, _ in lm.model.named_parameters()]
    assert [n for n in names if res.trains_fully(n, lm.parts) and lm.parts.part_of(n) == "vision"] == \
        [n for n in names if n.startswith("model.visual.patch_embed.")]
    bad = config_from_dict(_raw(lora={"projector_target_modules": ["vision_embed_tokens"]}))
    with pytest.raises(UserError) as e:
        resolve_trainables(lm.model, lm.parts, lm.family, plan_parts(bad.training, bad.visual_encoder_settings), bad.variants()[0])
    assert "projector_target_modules" in str(e.value) and "'vision_embed_tokens' matches no module" in str(e.value)


@pytest.mark.parametrize("suppress", [True, False])
def test_suppress_init_warnings_false_shows_the_load_report_through_the_cli(tmp_path, caplog, suppress):
    path = _without_projector(tmp_path)
    _setup_logging(debug=False)  # what the CLI does before any command: transformers quieted
    with caplog.at_level(logging.DEBUG):
        load_model(ModelConfig(name="m", hf_model_id=str(path)), VisualEncoderSettings(suppress_init_warnings=suppress))
    reports = [r.getMessage() for r in caplog.records if r.name.startswith("transformers") and "LOAD REPORT" in r.getMessage()]
    assert bool(reports) is (not suppress)
    assert not reports or "model.visual.merger.ln_q.weight" in reports[0]

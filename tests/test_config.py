"""Config: seed keys load, strings-as-numbers work, mistakes name the key path and the fix."""

from __future__ import annotations

import textwrap

import pytest

from vlmtune.config import load_config
from vlmtune.errors import UserError

SEED_003 = """
experiment_name: "vlm_lora_ablation"
output_dir: "results/vlm_lora_ablation"
data:
  train_csv: "data/quic360/train.csv"
  val_csv: "data/quic360/valid.csv"
  image_column: "url"
  instruction_column: "instruction"
  response_column: "response"
  num_workers: 4
models:
  - name: "qwen_vl_chat"
    hf_model_id: "Qwen/Qwen2.5-VL-0.5B-Instruct"
    model_type: "qwen_vl"
    torch_dtype: "float16"
  - name: "llava_1.5_7b"
    hf_model_id: "llava-hf/llava-1.5-7b-hf"
    model_type: "llava"
    torch_dtype: "float16"
lora_variants:
  - {name: "lora_r16", r: 16, alpha: 32, dropout: 0.1, target_modules: null}
  - {name: "lora_r32", r: 32, alpha: 64, dropout: 0.05, target_modules: null}
training:
  num_train_epochs: 1
  per_device_train_batch_size: 1
  per_device_eval_batch_size: 1
  gradient_accumulation_steps: 8
  learning_rate: 5e-5
  weight_decay: 0.0
  warmup_ratio: 0.03
  logging_steps: 10
  eval_strategy: "no"
  save_strategy: "epoch"
  save_total_limit: 1
  mixed_precision: "fp16"
  gradient_checkpointing: false
  max_grad_norm: 1.0
  seed: 42
  generation_max_new_tokens: 128
  generation_min_new_tokens: 0
  generation_num_beams: 1
  generation_do_sample: false
  generation_temperature: null
  generation_top_p: null
evaluation:
  enabled: true
"""


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_seed_003_config_loads_with_string_learning_rate(tmp_path):
    cfg = load_config(_write(tmp_path, SEED_003))
    assert cfg.training.learning_rate == pytest.approx(5e-5)  # YAML gives the string '5e-5'
    assert [m.name for m in cfg.models] == ["qwen_vl_chat", "llava_1.5_7b"]
    assert [(v.name, v.r, v.alpha) for v in cfg.variants()] == [("lora_r16", 16, 32), ("lora_r32", 32, 64)]
    assert cfg.training.mixed_precision == "fp16"
    assert str(cfg.resolved_output_dir()) == "results/vlm_lora_ablation"


def test_seed_001_trainer_arguments_are_accepted(tmp_path):
    extra = "".join("  " + line + "\n" for line in [
        "optim: adafactor", "lr_scheduler_type: constant", "bf16: true", "bf16_full_eval: true", "eval_steps: 50",
        "save_steps: 50", "metric_for_best_model: eval_loss", "greater_is_better: false", "save_safetensors: true",
        "dataloader_num_workers: 2", "gradient_checkpointing_kwargs: {use_reentrant: false}", "report_to: [wandb]",
        "run_name: my-run", "fsdp: full_shard auto_wrap", "fsdp_config: {min_num_params: 0, backward_prefetch: backward_pre}",
        "ddp_find_unused_parameters: false",
    ])
    text = SEED_003.replace('  mixed_precision: "fp16"\n', extra)
    cfg = load_config(_write(tmp_path, text))
    t = cfg.training
    assert (t.optim, t.lr_scheduler_type, t.mixed_precision, t.bf16_full_eval) == ("adafactor", "constant", "bf16", True)
    assert t.report_to == ["wandb"] and t.fsdp_config["backward_prefetch"] == "backward_pre"


@pytest.mark.parametrize(
    "snippet, where, words",
    [
        ("training:\n  learning_rat: 1e-4\n", "training.learning_rat", "learning_rate"),
        ("trainig:\n  seed: 1\n", "trainig", "training"),
        ("training:\n  learning_rate: fast\n", "training.learning_rate", "number"),
        ("training:\n  training_mode: lmm\n", "training.training_mode", "'llm'"),
        ("training:\n  parts: {vison: {train: full}}\n", "training.parts.vison", "vision"),
        ("training:\n  seed: 1.5\n", "training.seed", "whole number"),
        ("training:\n  save_safetensors: false\n", "training.save_safetensors", "safetensors"),
    ],
)
def test_mistakes_name_the_key_and_the_fix(tmp_path, snippet, where, words):
    base = "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: tiny:qwen2_5_vl}]\n"
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, base + snippet))
    line = e.value.line()
    assert where in line and words in line and "\n" not in line


def test_cross_field_errors(tmp_path):
    with pytest.raises(UserError, match="no training data"):
        load_config(_write(tmp_path, "models: [{name: m, hf_model_id: x}]\n"))
    with pytest.raises(UserError, match="duplicate model name"):
        load_config(_write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}, {name: m, hf_model_id: y}]\n"))
    with pytest.raises(UserError, match="both true"):
        load_config(_write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}]\ntraining: {bf16: true, fp16: true}\n"))
    with pytest.raises(UserError, match="freeze_visual_encoder"):
        load_config(_write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}]\ntraining: {training_mode: vision}\nvisual_encoder_settings: {freeze_visual_encoder: true}\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(_write(tmp_path, "data:\n  train_csv: [unclosed\nmodels: x\n"))
    assert "c.yaml:" in e.value.line() and "YAML" in e.value.line()


def test_lora_defaults_fill_variants(tmp_path):
    cfg = load_config(_write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}]\nlora: {r: 4, vision_target_modules: [qkv]}\nlora_variants: [{name: a}, {name: b, r: 8, target_modules: [q_proj]}]\n"))
    a, b = cfg.variants()
    assert (a.r, a.alpha, a.vision_target_modules, a.llm_target_modules) == (4, 8, ["qkv"], None)
    assert (b.r, b.alpha, b.llm_target_modules) == (8, 16, ["q_proj"])


def test_model_type_aliases_resolve_against_the_checkpoint():
    from vlmtune.models.families import find_family

    assert find_family("qwen_vl", "qwen2_vl").name == "qwen2_vl"
    assert find_family("qwen_vl", "qwen2_5_vl").name == "qwen2_5_vl"
    assert find_family(None, "llava").name == "llava"
    with pytest.raises(UserError, match="does not match the checkpoint"):
        find_family("llava", "qwen2_5_vl")
    with pytest.raises(UserError, match="unknown model_type 'lava'"):
        find_family("lava", "llava")


def test_set_overrides_merge_into_nested_sections(tmp_path):
    p = _write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}]\ntraining: {seed: 7, learning_rate: 1e-3}\n")
    cfg = load_config(p, overrides={"training": {"max_steps": 5}})
    assert (cfg.training.seed, cfg.training.max_steps, cfg.training.learning_rate) == (7, 5, 1e-3)
    with pytest.raises(UserError, match=r"\(with --set\): training.max_step.*max_steps"):
        load_config(p, overrides={"training": {"max_step": 5}})

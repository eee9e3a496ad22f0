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


# --------------------------------------------------------------------------------------
# Ranges: every numeric and enumerated setting is checked on load, one line per bad value.

BASE = {"data": {"train_csv": "t.csv"}, "models": [{"name": "m", "hf_model_id": "tiny:qwen2_5_vl"}]}


def _with(section: str, key: str, value):
    """BASE with `section.key: value` (section `models` sets it on the first model)."""
    import copy

    raw = copy.deepcopy(BASE)
    if section == "models":
        raw["models"][0][key] = value
    elif section == "lora_variants":
        raw["lora_variants"] = [{"name": "v", key: value}]
    else:
        raw.setdefault(section, {})[key] = value
    return raw


OUT_OF_RANGE = [
    ("training", "learning_rate", -1e-4, "training.learning_rate", "> 0"),
    ("training", "learning_rate", "0", "training.learning_rate", "> 0"),
    ("training", "num_train_epochs", 0, "training.num_train_epochs", "> 0"),
    ("training", "max_steps", 0, "training.max_steps", "-1 or > 0"),
    ("training", "max_steps", -5, "training.max_steps", "-1 or > 0"),
    ("training", "per_device_train_batch_size", 0, "training.per_device_train_batch_size", ">= 1"),
    ("training", "per_device_eval_batch_size", 0, "training.per_device_eval_batch_size", ">= 1"),
    ("training", "gradient_accumulation_steps", 0, "training.gradient_accumulation_steps", ">= 1"),
    ("training", "warmup_ratio", 1.5, "training.warmup_ratio", "in [0, 1]"),
    ("training", "warmup_ratio", -0.1, "training.warmup_ratio", "in [0, 1]"),
    ("training", "warmup_steps", -1, "training.warmup_steps", ">= 0"),
    ("training", "weight_decay", -0.01, "training.weight_decay", ">= 0"),
    ("training", "max_grad_norm", -1.0, "training.max_grad_norm", ">= 0"),
    ("training", "logging_steps", 0, "training.logging_steps", ">= 1"),
    ("training", "eval_steps", 0, "training.eval_steps", ">= 1"),
    ("training", "save_steps", 0, "training.save_steps", ">= 1"),
    ("training", "save_total_limit", 0, "training.save_total_limit", ">= 1"),
    ("training", "seed", -1, "training.seed", "in [0, 4294967295]"),
    ("training", "dataloader_num_workers", -1, "training.dataloader_num_workers", ">= 0"),
    ("training", "generation_max_new_tokens", 0, "training.generation_max_new_tokens", ">= 1"),
    ("training", "generation_min_new_tokens", -1, "training.generation_min_new_tokens", ">= 0"),
    ("training", "generation_num_beams", 0, "training.generation_num_beams", ">= 1"),
    ("training", "generation_temperature", 0, "training.generation_temperature", "> 0"),
    ("training", "generation_top_p", 0, "training.generation_top_p", "in (0, 1]"),
    ("training", "generation_top_p", 1.01, "training.generation_top_p", "in (0, 1]"),
    ("training", "parts", {"vision": {"lr_multiplier": -0.1}}, "training.parts.vision.lr_multiplier", ">= 0"),
    ("lora", "r", 0, "lora.r", ">= 1"),
    ("lora_variants", "r", 0, "lora_variants[0].r", ">= 1"),
    ("lora_variants", "alpha", 0, "lora_variants[0].alpha", "> 0"),
    ("lora_variants", "dropout", 1.0, "lora_variants[0].dropout", "in [0, 1)"),
    ("lora_variants", "dropout", -0.1, "lora_variants[0].dropout", "in [0, 1)"),
    ("models", "min_pixels", 0, "models[0].min_pixels", ">= 1"),
    ("models", "max_pixels", 0, "models[0].max_pixels", ">= 1"),
    ("data", "max_length", 0, "data.max_length", ">= 1"),
    ("data", "num_workers", -1, "data.num_workers", ">= 0"),
    ("data", "remote_image_max_bytes", 0, "data.remote_image_max_bytes", ">= 1"),
    ("data", "remote_image_timeout", 0, "data.remote_image_timeout", "> 0"),
    ("visual_encoder_settings", "visual_learning_rate_multiplier", -1, "visual_encoder_settings.visual_learning_rate_multiplier", ">= 0"),
    ("evaluation", "max_samples", 0, "evaluation.max_samples", ">= 1"),
    ("evaluation", "batch_size", 0, "evaluation.batch_size", ">= 1"),
]


@pytest.mark.parametrize("section, key, value, where, allowed", OUT_OF_RANGE, ids=[f"{c[3]}={c[2]}" for c in OUT_OF_RANGE])
def test_out_of_range_values_are_one_line_with_key_value_range_and_fix(section, key, value, where, allowed):
    from vlmtune.config import config_from_dict

    with pytest.raises(UserError) as e:
        config_from_dict(_with(section, key, value), "c.yaml")
    line = e.value.line()
    assert line.startswith(f"c.yaml: {where}: ") and f"must be {allowed} — use a value {allowed}" in line and "\n" not in line, line


@pytest.mark.parametrize("section, key, value", [
    ("training", "max_steps", -1), ("training", "max_steps", 1), ("training", "warmup_ratio", 1), ("training", "warmup_ratio", 0),
    ("training", "max_grad_norm", 0), ("training", "save_total_limit", None), ("training", "generation_top_p", 1),
    ("training", "seed", 0), ("lora_variants", "dropout", 0), ("training", "learning_rate", "1e-9"), ("models", "min_pixels", 1),
    ("training", "parts", {"vision": {"lr_multiplier": 0}}), ("training", "report_to", ["tensorboard", "wandb"]),
])
def test_values_at_the_edge_of_their_range_load(section, key, value):
    from vlmtune.config import config_from_dict

    config_from_dict(_with(section, key, value), "c.yaml")


def test_every_default_is_inside_its_own_range():
    import dataclasses

    from vlmtune import config as C

    checked = 0
    for cls in (C.DataConfig, C.ModelConfig, C.LoraConfig, C.PartConfig, C.VisualEncoderSettings, C.TrainingConfig, C.EvaluationConfig):
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("allowed")
            if rule is not None and f.default not in (None, dataclasses.MISSING):
                assert rule.violation(f.default) is None, f"{cls.__name__}.{f.name}"
                checked += 1
    assert checked >= 25


@pytest.mark.parametrize("key, value, words", [
    ("lr_scheduler_type", "cosin", "'cosin' is not a transformers `SchedulerType` name — did you mean 'cosine'?"),
    ("optim", "adam", "'adam' is not a transformers `OptimizerNames` name — did you mean 'adamw_torch'?"),
    ("report_to", ["wandb", "tensorbord"], "training.report_to[1]: 'tensorbord' is not a transformers `report_to` integration"),
])
def test_scheduler_optimizer_and_tracker_names_are_checked_against_transformers(key, value, words):
    from vlmtune.config import config_from_dict

    with pytest.raises(UserError) as e:
        config_from_dict(_with("training", key, value), "c.yaml")
    assert words in e.value.line()
    for name in ("cosine_with_restarts", "constant_with_warmup"):
        assert config_from_dict(_with("training", "lr_scheduler_type", name), "c.yaml").training.lr_scheduler_type == name
    assert config_from_dict(_with("training", "optim", "adafactor"), "c.yaml").training.optim == "adafactor"


def test_metric_names_are_checked_by_vlmtune_check(tmp_path, capsys):
    # the registry lives in eval/ (downstream of config): `check` and the grid ask it
    import yaml

    from vlmtune.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_with("evaluation", "metrics", ["exact_match", "blue4"])))
    assert main(["check", str(p), "--no-tokens"]) == 1
    out = capsys.readouterr().out
    assert "evaluation.metrics: unknown metric 'blue4'" in out and "did you mean 'bleu4'?" in out


def test_a_variants_training_overrides_are_range_checked_at_load(tmp_path):
    p = _write(tmp_path, "data: {train_csv: t.csv}\nmodels: [{name: m, hf_model_id: x}]\n"
                         "lora_variants: [{name: a}, {name: b, training: {learning_rate: 1e-4, warmup_ratio: 2}}]\n")
    with pytest.raises(UserError) as e:
        load_config(p)  # at load: not only when variant b's run starts
    assert e.value.line().startswith(f"{p}: lora_variants.b.training.warmup_ratio: 2.0 is out of range: must be in [0, 1]")


@pytest.mark.parametrize("model, words", [
    ({"min_pixels": 5000, "max_pixels": 4000}, "models[0].max_pixels: 4000 is less than min_pixels (5000)"),
    ({"max_pixels": 4000}, "models[0].max_pixels: 4000 is less than the default min_pixels (50176)"),
])
def test_pixel_bounds_must_be_ordered(model, words):
    from vlmtune.config import config_from_dict

    with pytest.raises(UserError) as e:
        config_from_dict({**BASE, "models": [{"name": "m", "hf_model_id": "x", **model}]}, "c.yaml")
    assert words in e.value.line() and "min_pixels <= max_pixels" in e.value.line()
    config_from_dict({**BASE, "models": [{"name": "m", "hf_model_id": "x", "min_pixels": 3136, "max_pixels": 3136}]}, "c.yaml")


def test_min_new_tokens_may_not_exceed_max_new_tokens():
    from vlmtune.config import config_from_dict

    raw = {**BASE, "training": {"generation_min_new_tokens": 10, "generation_max_new_tokens": 5}}
    with pytest.raises(UserError, match=r"generation_min_new_tokens: 10 is more than generation_max_new_tokens \(5\)"):
        config_from_dict(raw, "c.yaml")


def test_docs_show_each_fields_allowed_range():
    from vlmtune.config import describe_keys

    docs = describe_keys()
    assert "| key | type | default | allowed | meaning |" in docs
    for row in ("| `learning_rate` | a number | 5e-05 | > 0 |", "| `max_steps` | an integer | -1 | -1 or > 0 |",
                "| `dropout` | a number | None | in [0, 1) |", "| `generation_top_p` | a number | None | in (0, 1] |",
                "| `lr_scheduler_type` | a string | 'linear' | a transformers `SchedulerType` name |"):
        assert row in docs, row


# --------------------------------------------------------------------------------------
# --set reaches every key, list items included.

TWO_MODELS = """
data: {train_csv: t.csv}
models:
  - {name: a, hf_model_id: tiny:qwen2_5_vl}
  - {name: b, hf_model_id: tiny:qwen2_vl}
lora_variants:
  - {name: v1, r: 4}
  - {name: v2, r: 16, target_modules: [q_proj]}
"""


def test_set_paths_index_into_lists_and_reach_nested_keys(tmp_path):
    from vlmtune.cli import load_cli_config

    p = _write(tmp_path, TWO_MODELS)
    cfg = load_cli_config(str(p), ["models.0.hf_model_id=tiny:llava", "lora_variants.1.r=8", "training.parts.vision.train=full",
                                    "lora_variants.1.target_modules.0=v_proj", "training.learning_rate=1e-4"])
    assert [m.hf_model_id for m in cfg.models] == ["tiny:llava", "tiny:qwen2_vl"]  # the other item stays
    assert [(v.name, v.r) for v in cfg.lora_variants] == [("v1", 4), ("v2", 8)]
    assert cfg.lora_variants[1].target_modules == ["v_proj"]
    assert cfg.training.parts["vision"].train == "full" and cfg.training.learning_rate == 1e-4
    assert p.read_text() == textwrap.dedent(TWO_MODELS)  # the file itself is untouched


@pytest.mark.parametrize("pair, words", [
    ("models.2.hf_model_id=x", "--set models.2.hf_model_id=x: models is a list of 2: there is no item 2 — use an index 0..1, e.g. --set models.0.hf_model_id=..."),
    ("models.name=x", "--set models.name=x: models is a list of 2: 'name' is not an index — use an index 0..1, e.g. --set models.0.name=..."),
    ("training.0=x", "--set training.0=x: training is a mapping, not a list: there is no item 0 — use a key: training_mode, parts,"),
    ("data.train_csv.0=x", "--set data.train_csv.0=x: data.train_csv is 't.csv', not a mapping or a list"),
    ("evaluation.metrics.0=bleu4", "--set evaluation.metrics.0=bleu4: evaluation.metrics is not in the config: there is no item 0"),
    ("training.max_steps", "--set training.max_steps: expected key.path=value"),
])
def test_set_paths_that_cannot_be_walked_name_the_set_and_the_valid_indices(tmp_path, pair, words):
    from vlmtune.cli import load_cli_config

    with pytest.raises(UserError) as e:
        load_cli_config(str(_write(tmp_path, TWO_MODELS)), [pair])
    assert e.value.line().startswith(words) and "\n" not in e.value.line(), e.value.line()


def test_set_values_are_validated_like_the_file(tmp_path, capsys):
    from vlmtune.cli import main

    p = _write(tmp_path, TWO_MODELS)
    assert main(["check", str(p), "--no-tokens", "--set", "lora_variants.1.r=0"]) == 1
    out = capsys.readouterr()
    assert f"{p} (with --set): lora_variants[1].r: 0 is out of range: must be >= 1" in out.out and "Traceback" not in out.out + out.err
    assert main(["check", str(p), "--no-tokens", "--set", "models.7.name=x"]) == 1
    assert "--set models.7.name=x: models is a list of 2" in capsys.readouterr().out


def test_set_in_the_quick_form_reaches_list_items():
    from vlmtune.cli import build_parser, quick_config

    args = build_parser().parse_args(["train", "--dataset", "d.jsonl", "--model-id", "tiny:qwen2_5_vl",
                                      "--set", "models.0.min_pixels=3136", "--set", "models.0.max_pixels=3136", "--set", "training.parts.vision.train=full"])
    cfg = quick_config(args)
    assert (cfg.models[0].min_pixels, cfg.models[0].max_pixels, cfg.training.parts["vision"].train) == (3136, 3136, "full")
    args = build_parser().parse_args(["train", "--dataset", "d.jsonl", "--model-id", "tiny:qwen2_5_vl", "--set", "models.1.name=x"])
    with pytest.raises(UserError, match=r"^--set models.1.name=x: models is a list of 1: there is no item 1 — use an index 0..0"):
        quick_config(args)

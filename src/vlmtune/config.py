"""The one YAML file, as typed dataclasses.

The shape follows seed 003 (``experiment_name``, ``output_dir``, ``data``, ``models``,
``lora_variants``, ``training``, ``evaluation``) plus seed 002's ``lora`` target groups and
``training.training_mode``/``training.parts``, and seed 000's ``visual_encoder_settings``.
Every key maps 1:1 to a dataclass field below; each field's ``help`` says what it does.

Validation happens on load: wrong types, unknown keys (with a did-you-mean) and impossible
combinations raise `UserError` naming the key path and the fix. YAML reads ``5e-5`` as a
string; numeric fields accept such strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError

PARTS = ("vision", "projector", "llm")
TRAIN_METHODS = ("frozen", "lora", "full")
TRAINING_MODES = ("projector", "llm", "vision", "both")


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train_csv: Optional[str] = _f(None, "Training CSV: one row per sample (image, instruction, response).")
    val_csv: Optional[str] = _f(None, "Validation CSV (eval loss during training; evaluation fallback).")
    test_csv: Optional[str] = _f(None, "Test CSV for generation metrics after training.")
    train_jsonl: Optional[str] = _f(None, "Training JSONL: `messages` or `conversations` records with `images`.")
    val_jsonl: Optional[str] = _f(None, "Validation JSONL.")
    test_jsonl: Optional[str] = _f(None, "Test JSONL.")
    image_column: str = _f("url", "CSV column holding the image path (or URL).")
    instruction_column: str = _f("instruction", "CSV column with the user's instruction.")
    response_column: str = _f("response", "CSV column with the target response.")
    query_column: str = _f("query", "Evaluation-CSV column used when `instruction_column` is absent.")
    annotation_column: str = _f("annotation", "Evaluation-CSV column used when `response_column` is absent.")
    image_root: Optional[str] = _f(None, "Folder relative image paths resolve against (else the data file's folder, then the working directory).")
    system_message: Optional[str] = _f(None, "System message put before every conversation built from a CSV row.")
    num_workers: int = _f(0, "DataLoader workers (seed default 4; 0 is fastest for tiny data).")
    max_length: int = _f(2048, "Longest tokenized sample, image tokens included.")
    on_overlength: Literal["skip", "error"] = _f("skip", "A sample longer than `max_length` is skipped (counted, warned) or is an error. Never truncated: that would cut image tokens.")
    on_bad_sample: Literal["error", "skip"] = _f("error", "A malformed row or image stops the run before training (error) or is skipped, logged and counted in metrics.json (skip).")
    allow_remote_images: bool = _f(False, "Fetch http(s):// image URLs (size-capped, with a timeout); off: remote URLs are an error.")
    remote_image_max_bytes: int = _f(20_000_000, "Largest remote image fetched, in bytes.")
    remote_image_timeout: float = _f(20.0, "Seconds before a remote image fetch gives up.")
    allow_absolute_paths: bool = _f(False, "Allow image paths outside their root (data.image_root, the data file's folder or the working directory): absolute paths and '..'.")


@dataclass
class ModelConfig:
    name: str = _f(help="Short name used in run directory names (`<name>__<variant>`).")
    hf_model_id: str = _f(help="Hub id, local directory, or `tiny:<family>` for an offline tiny model.")
    model_type: Optional[str] = _f(None, "Family key (`qwen_vl`, `qwen2_5_vl`, `llava`, ...). Derived from the model's config when omitted.")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = _f("auto", "Weight dtype: `auto` = bfloat16 on a GPU that has it, float32 otherwise.")
    min_pixels: Optional[int] = _f(None, "Qwen-VL dynamic resolution lower bound (pixels). Default 224*224.")
    max_pixels: Optional[int] = _f(None, "Qwen-VL dynamic resolution upper bound (pixels). Default 224*224 (the seed's bound).")
    image_processor: Optional[dict[str, Any]] = _f(None, "Image processor settings to override, e.g. {size: {longest_edge: 728}, do_image_splitting: false} for Idefics3/SmolVLM tiles (Qwen-VL: use min_pixels/max_pixels).")
    trust_remote_code: bool = _f(False, "Allow the model repository's own Python code to run.")
    load_in_4bit: bool = _f(False, "Load the base weights in 4-bit (bitsandbytes) for QLoRA.")
    attn_implementation: Optional[str] = _f(None, "`eager`, `sdpa` or `flash_attention_2` (GPU extra).")


@dataclass
class LoraConfig:
    """One LoRA variant (also the shape of the top-level `lora:` defaults)."""

    name: Optional[str] = _f(None, "Variant name used in run directory names.")
    r: Optional[int] = _f(None, "LoRA rank (default 16).")
    alpha: Optional[float] = _f(None, "LoRA alpha (default 2*r).")
    dropout: Optional[float] = _f(None, "LoRA dropout (default 0.05).")
    target_modules: Optional[list[str]] = _f(None, "Leaf module names for the LLM part; null = the family default. Same as `llm_target_modules`.")
    llm_target_modules: Optional[list[str]] = _f(None, "LoRA targets inside the LLM (scoped: never wraps vision modules).")
    vision_target_modules: Optional[list[str]] = _f(None, "LoRA targets inside the vision encoder.")
    projector_target_modules: Optional[list[str]] = _f(None, "LoRA targets inside the projector (when the projector trains with `lora`).")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases train with LoRA.")
    training: Optional[dict[str, Any]] = _f(None, "Training keys this variant overrides, e.g. {training_mode: both, learning_rate: 1e-4, parts: {vision: {train: full, lr_multiplier: 0.1}}}: ablate what trains, not only LoRA shape.")


@dataclass
class PartConfig:
    train: Optional[Literal["frozen", "lora", "full"]] = _f(None, "How this part trains; default from `training_mode`.")
    lr_multiplier: Optional[float] = _f(None, "This part's learning rate = training.learning_rate * lr_multiplier.")


@dataclass
class VisualEncoderSettings:
    """Seed 000's visual encoder settings."""

    suppress_init_warnings: bool = _f(True, "Replace transformers' per-weight 'newly initialized' warnings by one summary line.")
    improve_initialization: bool = _f(False, "Re-initialise newly initialized weights with Xavier-uniform (biases zero).")
    freeze_visual_encoder: bool = _f(False, "Freeze the vision encoder whatever the training mode.")
    visual_learning_rate_multiplier: float = _f(0.1, "Vision encoder LR = learning_rate * this (seed 000: 1/10).")


@dataclass
class TrainingConfig:
    # What trains (seed 002)
    training_mode: Literal["projector", "llm", "vision", "both"] = _f("llm", "projector: projector only (stage 1); llm: projector + LLM; vision: projector + vision; both: all three.")
    parts: dict[str, PartConfig] = _f(help="Per-part overrides: {vision|projector|llm: {train, lr_multiplier}}.", factory=dict)
    # Seed 003 keys
    num_train_epochs: float = _f(1.0, "Epochs over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = _f(1, "Training batch size per device.")
    per_device_eval_batch_size: int = _f(1, "Evaluation batch size per device (eval loss and generation).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(5e-5, "Base learning rate (the LLM's); parts scale it by their lr_multiplier.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = _f(0.0, "Fraction of steps for linear warmup.")
    warmup_steps: int = _f(0, "Warmup steps (wins over warmup_ratio when > 0).")
    lr_scheduler_type: str = _f("linear", "transformers scheduler name: linear, cosine, constant, constant_with_warmup, ...")
    optim: str = _f("adamw_torch", "transformers optimizer name: adamw_torch, adafactor, ...")
    logging_steps: int = _f(10, "Log train loss every N steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = _f("no", "When to compute eval loss on the validation split.")
    eval_steps: Optional[int] = _f(None, "Eval every N steps (eval_strategy: steps).")
    save_strategy: Literal["no", "steps", "epoch", "best"] = _f("epoch", "When to write checkpoints.")
    save_steps: int = _f(500, "Checkpoint every N steps (save_strategy: steps).")
    save_total_limit: Optional[int] = _f(1, "Keep at most N checkpoints.")
    load_best_model_at_end: bool = _f(False, "Reload the best checkpoint (by metric_for_best_model) at the end.")
    metric_for_best_model: Optional[str] = _f(None, "e.g. eval_loss.")
    greater_is_better: Optional[bool] = _f(None, "Whether a larger metric_for_best_model is better.")
    save_safetensors: bool = _f(True, "Weights are always safetensors; false is refused.")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "Autocast precision for training.")
    bf16: Optional[bool] = _f(None, "Seed 001 spelling of mixed_precision: bf16.")
    fp16: Optional[bool] = _f(None, "Seed 001 spelling of mixed_precision: fp16.")
    bf16_full_eval: bool = _f(False, "Run evaluation fully in bf16.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory.")
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = _f(None, "Default {use_reentrant: false}.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    seed: int = _f(42, "Seed for init, shuffling and dropout.")
    dataloader_num_workers: Optional[int] = _f(None, "Defaults to data.num_workers.")
    report_to: Union[str, list[str]] = _f("none", "none, wandb, tensorboard, mlflow or a list of them.")
    run_name: Optional[str] = _f(None, "Tracker run name; default `<experiment>/<model>__<variant>`.")
    fsdp: Optional[str] = _f(None, "e.g. 'full_shard auto_wrap' (multi-process only).")
    fsdp_config: Optional[dict[str, Any]] = _f(None, "FSDP options (seed 001).")
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP: look for parameters without gradients.")
    resume: Literal["auto", "never"] = _f("auto", "auto: continue from the run's last checkpoint when there is one.")
    nan_policy: Literal["stop", "skip_batch"] = _f("stop", "A NaN/inf loss stops training naming the step and samples, keeping the last good checkpoint (stop), or that batch is skipped and counted (skip_batch).")
    # Generation (used by evaluation)
    generation_max_new_tokens: int = _f(128, "Max new tokens per generated answer.")
    generation_min_new_tokens: int = _f(0, "Min new tokens per generated answer.")
    generation_num_beams: int = _f(1, "Beam count (1 = greedy).")
    generation_do_sample: bool = _f(False, "Sample instead of greedy/beam search.")
    generation_temperature: Optional[float] = _f(None, "Sampling temperature.")
    generation_top_p: Optional[float] = _f(None, "Nucleus sampling p.")


@dataclass
class EvaluationConfig:
    enabled: bool = _f(True, "false = train only.")
    split: Literal["test", "val"] = _f("test", "Which split to generate on (test falls back to val when absent).")
    max_samples: Optional[int] = _f(None, "Evaluate only the first N samples.")
    batch_size: Optional[int] = _f(None, "Generation batch size; default training.per_device_eval_batch_size.")
    metrics: Optional[list[str]] = _f(None, "Metric names (exact_match, exact_match_normalized, bleu4, rouge_l, meteor, cider, coco, vqa_accuracy, anls, relaxed_accuracy, cer, wer, token_stats); default exact_match, bleu4, meteor, rouge_l, cider, token_stats.")


@dataclass
class Config:
    experiment_name: str = _f("vlmtune", "Experiment name.")
    output_dir: Optional[str] = _f(None, "Where run directories go; default results/<experiment_name>.")
    data: DataConfig = _f(help="Data sources and columns.", factory=DataConfig)
    models: list[ModelConfig] = _f(help="Models to train.", factory=list)
    lora: LoraConfig = _f(help="Defaults for every LoRA variant (seed 002 target groups).", factory=LoraConfig)
    lora_variants: list[LoraConfig] = _f(help="LoRA variants; every model x every variant is run.", factory=list)
    training: TrainingConfig = _f(help="Trainer settings.", factory=TrainingConfig)
    evaluation: EvaluationConfig = _f(help="Evaluation after training.", factory=EvaluationConfig)
    visual_encoder_settings: VisualEncoderSettings = _f(help="Seed 000 settings.", factory=VisualEncoderSettings)
    baseline: Optional[str] = _f(None, "Run compared against in ablation_summary.json: a variant name (per model) or a run name `<model>__<variant>`; default the first variant of each model.")
    # Where the YAML lives; relative data paths fall back to this folder. Not a YAML key.
    config_dir: Optional[str] = field(default=None, repr=False, metadata={"internal": True})

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("results", self.experiment_name))

    def variants(self) -> list[LoraConfig]:
        """Every LoRA variant with the `lora:` defaults filled in (and the library defaults)."""
        raw = self.lora_variants or [LoraConfig(name="lora_r16")]
        out = []
        for v in raw:
            merged = {}
            for f in dataclasses.fields(LoraConfig):
                val = getattr(v, f.name)
                merged[f.name] = val if val is not None else getattr(self.lora, f.name)
            merged["r"] = merged["r"] or 16
            merged["alpha"] = merged["alpha"] if merged["alpha"] is not None else 2 * merged["r"]
            merged["dropout"] = merged["dropout"] if merged["dropout"] is not None else 0.05
            if merged["llm_target_modules"] is None:
                merged["llm_target_modules"] = merged["target_modules"]
            out.append(LoraConfig(**merged))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("config_dir", None)
        return d

    def for_variant(self, variant: LoraConfig, src: str = "config") -> "Config":
        """This config with the variant's `training:` overrides applied (and validated)."""
        if not variant.training:
            return self
        merged = deep_merge(dataclasses.asdict(self.training), variant.training)
        t = from_dict(TrainingConfig, merged, f"lora_variants.{variant.name}.training", src)
        return validate(dataclasses.replace(self, training=t), src, variants=False)


# --------------------------------------------------------------------------------------
# Parsing: dict -> dataclass with path-naming errors.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, src)
            except UserError:
                pass
        raise UserError(f"{src}: {path}", f"expected {_type_name(tp)}, got {value!r}", f"set {path} to {_type_name(tp)}")
    if value is None:
        raise UserError(f"{src}: {path}", f"expected {_type_name(tp)}, got null", f"set {path} or remove the key to use its default")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(repr(a) for a in args)}"
        raise UserError(f"{src}: {path}", f"{value!r} is not one of {', '.join(repr(a) for a in args)}", hint)
    if origin is list:
        if isinstance(value, (str, int, float)) and args[0] is str:
            value = [value]  # `target_modules: q_proj` means a list of one
        if not isinstance(value, list):
            raise UserError(f"{src}: {path}", f"expected {_type_name(tp)}, got {value!r}", "write it as a YAML list")
        return [_coerce(v, args[0], f"{path}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{src}: {path}", f"expected a mapping, got {value!r}", "write it as `key: value` lines")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise UserError(f"{src}: {path}", f"expected true or false, got {value!r}", f"set {path}: true or {path}: false")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{src}: {path}", f"expected an integer, got {value!r}", f"set {path} to a whole number")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
            if f == int(f):
                return int(f)
        except (TypeError, ValueError):
            pass
        raise UserError(f"{src}: {path}", f"expected an integer, got {value!r}", f"set {path} to a whole number")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{src}: {path}", f"expected a number, got {value!r}", f"set {path} to a number like 5e-5")
        try:
            return float(value)  # YAML 1.1 reads `5e-5` as a string; accept it
        except (TypeError, ValueError):
            raise UserError(f"{src}: {path}", f"expected a number, got {value!r}", f"set {path} to a number like 5e-5") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{src}: {path}", f"expected a string, got {value!r}", f"set {path} to a quoted string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls: type, data: Any, path: str = "", src: str = "config") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with a did-you-mean."""
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{src}: {where}", f"expected a mapping, got {data!r}", "write it as `key: value` lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        kp = f"{path}.{key}" if path else key
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            fix = f"did you mean `{near[0]}`?" if near else f"known keys here: {', '.join(fields)}"
            raise UserError(f"{src}: {kp}", "unknown key", fix)
        kwargs[key] = _coerce(value, hints[key], kp, src)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kp = f"{path}.{name}" if path else name
            raise UserError(f"{src}: {kp}", "required key is missing", f"add `{name}:` ({f.metadata.get('help', '')})")
    return cls(**kwargs)


def validate(cfg: Config, src: str = "config", variants: bool = True) -> Config:
    """Cross-field checks that a single field's type cannot express (`variants=False`: skip
    re-checking each variant's overrides, for the per-variant configs themselves)."""
    if not cfg.models:
        raise UserError(f"{src}: models", "no models listed", "add at least one entry with `name` and `hf_model_id`")
    seen = set()
    for i, m in enumerate(cfg.models):
        if m.name in seen:
            raise UserError(f"{src}: models[{i}].name", f"duplicate model name {m.name!r}", "give every model a unique name")
        seen.add(m.name)
        if "__" in m.name or "/" in m.name:
            raise UserError(f"{src}: models[{i}].name", f"{m.name!r} contains '__' or '/'", "use a plain name: it becomes a folder name")
    names = set()
    for i, v in enumerate(cfg.lora_variants):
        if not v.name:
            raise UserError(f"{src}: lora_variants[{i}].name", "missing", "give every variant a `name`")
        if v.name in names:
            raise UserError(f"{src}: lora_variants[{i}].name", f"duplicate variant name {v.name!r}", "give every variant a unique name")
        names.add(v.name)
    for v in cfg.variants():
        if v.r is not None and v.r <= 0:
            raise UserError(f"{src}: lora_variants.{v.name}.r", f"rank must be positive, got {v.r}", "use e.g. r: 16")
        if v.training and variants:
            cfg.for_variant(v, src)  # its overrides must make a valid training section
    t = cfg.training
    for part, pc in t.parts.items():
        if part not in PARTS:
            near = difflib.get_close_matches(part, PARTS, n=1)
            raise UserError(f"{src}: training.parts.{part}", "unknown part", f"did you mean `{near[0]}`?" if near else "parts are vision, projector, llm")
        if pc.lr_multiplier is not None and pc.lr_multiplier < 0:
            raise UserError(f"{src}: training.parts.{part}.lr_multiplier", "must be >= 0", "use e.g. 0.1")
    if t.bf16 and t.fp16:
        raise UserError(f"{src}: training", "bf16 and fp16 are both true", "choose one (mixed_precision: bf16 or fp16)")
    if t.bf16:
        t.mixed_precision = "bf16"
    elif t.fp16:
        t.mixed_precision = "fp16"
    if not t.save_safetensors:
        raise UserError(f"{src}: training.save_safetensors", "vlmtune writes safetensors only", "remove the key or set it to true")
    if t.eval_strategy == "steps" and not t.eval_steps:
        t.eval_steps = t.logging_steps
    if t.load_best_model_at_end and t.eval_strategy == "no":
        raise UserError(f"{src}: training.load_best_model_at_end", "needs evaluation during training", "set eval_strategy: steps (and data.val_csv) or turn it off")
    if t.load_best_model_at_end and t.save_strategy not in (t.eval_strategy, "best"):
        raise UserError(f"{src}: training.save_strategy", f"must match eval_strategy ({t.eval_strategy}) when load_best_model_at_end is true", f"set save_strategy: {t.eval_strategy}")
    if cfg.baseline is not None:
        runs = {f"{m.name}__{v.name}" for m in cfg.models for v in cfg.variants()}
        if cfg.baseline not in runs and cfg.baseline not in {v.name for v in cfg.variants()}:
            raise UserError(f"{src}: baseline", f"{cfg.baseline!r} is neither a variant nor a run", f"use a variant name or one of {', '.join(sorted(runs))}")
    d = cfg.data
    if not (d.train_csv or d.train_jsonl):
        raise UserError(f"{src}: data", "no training data", "set data.train_csv or data.train_jsonl")
    for split in ("train", "val", "test"):
        if getattr(d, f"{split}_csv") and getattr(d, f"{split}_jsonl"):
            raise UserError(f"{src}: data.{split}_jsonl", f"both {split}_csv and {split}_jsonl are set", "keep one of them")
    ve = cfg.visual_encoder_settings
    vision_override = t.parts.get("vision")
    # `both` with a frozen encoder just means projector + LLM; only an explicit request to
    # train vision contradicts the freeze.
    if ve.freeze_visual_encoder and (t.training_mode == "vision" or (vision_override and vision_override.train not in (None, "frozen"))):
        raise UserError(f"{src}: visual_encoder_settings.freeze_visual_encoder", "true, but the config also asks the vision encoder to train", "set freeze_visual_encoder: false, or training_mode: llm")
    return cfg


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read, validate and return the config at `path` (safe YAML loader)."""
    p = Path(path)
    src = str(path)
    if not p.is_file():
        raise UserError(src, "config file not found", "check the path (run from the folder the config's paths are relative to)")
    try:
        with open(p, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}:{mark.line + 1}" if mark else src
        raise UserError(where, f"not valid YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax at that line") from None
    except UnicodeDecodeError as e:
        raise UserError(src, f"not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    if overrides:
        raw = deep_merge(raw or {}, overrides)
        src = f"{src} (with --set)"
    cfg = from_dict(Config, raw, "", src)
    cfg.config_dir = str(p.resolve().parent)
    return validate(cfg, src)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, merging nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict[str, Any], src: str = "config", config_dir: Optional[str] = None) -> Config:
    cfg = from_dict(Config, raw, "", src)
    cfg.config_dir = config_dir
    return validate(cfg, src)


def describe_keys() -> str:
    """Markdown reference of every config key, generated from the dataclasses' help text."""
    lines = ["# Config reference", "", "Generated from `src/vlmtune/config.py` (`python -m vlmtune.config > docs/config.md`).", ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        lines.extend([f"## `{prefix or '(top level)'}`", "", "| key | type | default | meaning |", "|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(tp) or (inner is not None and dataclasses.is_dataclass(inner)):
                nested.append((tp if dataclasses.is_dataclass(tp) else inner, f"{prefix}.{f.name}" if prefix else f.name, inner is not None))
            default = "" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else (
                repr(f.default) if f.default is not dataclasses.MISSING else "")
            lines.append(f"| `{f.name}` | {_type_name(tp).replace(' | ', ' or ')} | {default} | {f.metadata.get('help', '')} |")
        lines.append("")
        for sub, name, is_list in nested:
            section(sub, name + ("[]" if is_list else ""))

    section(Config, "")
    lines += ["`training.parts.<vision|projector|llm>` take:", ""]
    section(PartConfig, "training.parts.<part>")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_keys())

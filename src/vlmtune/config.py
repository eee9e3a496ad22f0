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

import copy
import dataclasses
import difflib
import functools
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError

log = logging.getLogger("vlmtune")

PARTS = ("vision", "projector", "llm")
TRAIN_METHODS = ("frozen", "lora", "full")
TRAINING_MODES = ("projector", "llm", "vision", "both")
DATA_FILE_KEYS = ("train_csv", "val_csv", "test_csv", "train_jsonl", "val_jsonl", "test_jsonl")
DATA_ANY_KEYS = ("train_file", "val_file", "test_file")
"""Data in any format (data/sources.py): a local file or folder, or a Hugging Face hub id."""
DATA_COLUMN_KEYS = ("messages", "conversations", "images", "image", "instruction", "response", "system", "id", "references")
"""The fields `data.columns` maps onto a record's own field or a table's column names."""


def resolve_path(path: str, config_dir: Optional[str] = None) -> Path:
    """Where a path written in a config points: the one rule every reader of a config path
    applies (data files and data.image_root with `config_dir`; output_dir, a local model,
    training.deepspeed without), and `Config.with_absolute_paths` with them.

    `~` expands; a relative path means the working directory when it exists there, else the
    config file's folder (`config_dir`, when given). A path found in neither is where it would
    be: in `config_dir` when given, else the working directory. Kept as written (relative)
    where the working directory holds it, so messages show the user's spelling."""
    p = Path(path).expanduser()
    if p.is_absolute() or not config_dir or p.exists():
        return p
    return Path(config_dir) / p


def is_local_model_path(model_id: str) -> bool:
    """A models[].hf_model_id that names a local folder (loaded from disk, relative to the
    working directory) rather than a hub id or a `tiny:` model."""
    if model_id.startswith("tiny:"):
        return False
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().exists()


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field: strict (`gt`, `lt`) and inclusive (`ge`, `le`)
    bounds, plus `also`: special values outside them (max_steps: -1 = off)."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    also: tuple[Any, ...] = ()

    def violation(self, value: Any) -> Optional[str]:
        """Why `value` is not allowed (None: it is)."""
        if value in self.also:
            return None
        ok = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
              and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        return None if ok else f"{value!r} is out of range: must be {self.describe()}"

    def describe(self) -> str:
        """'> 0', '>= 1', 'in [0, 1)', '-1 or > 0': the docs' `allowed` column and the error."""
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo and hi:
            text = f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        elif lo:
            text = f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        else:
            assert hi is not None, "Bounds without any bound"
            text = f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        return " or ".join([*(repr(a) for a in self.also), text])


@dataclass(frozen=True)
class Choices:
    """The allowed values of a free-string field whose valid names live in another library
    (transformers' scheduler and optimizer names, the metric registry)."""

    label: str
    """How the docs and errors name the set, e.g. "transformers `SchedulerType` name"."""
    names: typing.Callable[[], typing.Sequence[str]]
    """The valid names, computed on first use: importing transformers takes seconds, so a
    config that keeps the default never pays for it."""

    def violation(self, value: Any) -> Optional[str]:
        names = self.names()
        return None if value in names else f"{value!r} is not a {self.label}"

    def fix(self, value: Any) -> str:
        names = list(self.names())
        # A prefix ('adam' -> 'adamw_torch') is a better guess than the closest spelling.
        near = [n for n in names if n.startswith(str(value))][:1] or difflib.get_close_matches(str(value), names, n=1)
        return f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(names)}"

    def describe(self) -> str:
        return f"a {self.label}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@functools.cache
def _scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


@functools.cache
def _optimizer_names() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


@functools.cache
def _report_to_names() -> tuple[str, ...]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("none", "all", *INTEGRATION_TO_CALLBACK)


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, *,
       gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None, le: Optional[float] = None,
       also: tuple[Any, ...] = (), choices: Optional[Choices] = None) -> Any:
    """A config field: its default, its help text, and the values it allows (numeric bounds
    `gt`/`ge`/`lt`/`le` with `also` exceptions, or `choices`). The rule lives here, beside the
    field; `from_dict` enforces it on every load and `describe_keys` prints it in the docs."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["allowed"] = choices
    elif (gt, ge, lt, le) != (None, None, None, None):
        metadata["allowed"] = Bounds(gt, ge, lt, le, also)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    train_csv: Optional[str] = _f(None, "Training CSV: one row per sample (image, instruction, response).")
    val_csv: Optional[str] = _f(None, "Validation CSV (eval loss during training; evaluation fallback).")
    test_csv: Optional[str] = _f(None, "Test CSV for generation metrics after training.")
    train_jsonl: Optional[str] = _f(None, "Training JSONL: `messages` or `conversations` records with `images` (a JSON array of them works too).")
    val_jsonl: Optional[str] = _f(None, "Validation JSONL.")
    test_jsonl: Optional[str] = _f(None, "Test JSONL.")
    train_file: Optional[str] = _f(None, "Training data in any format of docs/data-formats.md: CSV; JSON array or JSONL of LLaVA, LLaMA-Factory/ShareGPT, TRL/HF chat or OpenAI content-part records; Parquet; Arrow; a `datasets` save_to_disk folder; a Hugging Face hub id. The format is detected from the extension and the content (`format` overrides it). Not together with train_csv/train_jsonl.")
    val_file: Optional[str] = _f(None, "Validation data in any format (see train_file). Not together with val_csv/val_jsonl.")
    test_file: Optional[str] = _f(None, "Test data in any format (see train_file). Not together with test_csv/test_jsonl.")
    format: Optional[Literal["csv", "jsonl", "json", "parquet", "arrow", "hf"]] = _f(None, "Format of train_file/val_file/test_file, instead of detecting it: csv; jsonl (one record per line); json (one array of records); parquet; arrow; hf (a `datasets` save_to_disk folder, a folder of data files, or a hub id).")
    columns: Optional[dict[str, str]] = _f(None, "Which field or column holds what, for record and table data (JSON, JSONL, Parquet, Arrow, `datasets`), e.g. {images: photos, messages: dialog}. Keys: messages, conversations, images, image, instruction, response, system, id, references. A CSV reads its image, instruction and response columns from here too (over image_column, instruction_column, response_column).")
    splits: Optional[dict[str, str]] = _f(None, "Which split of a `datasets` dataset with several (hub id, save_to_disk DatasetDict) train/val/test read, e.g. {val: validation}. Default: train; validation (or val, valid, dev); test; or the only split there is.")
    hf_config_name: Optional[str] = _f(None, "Hub datasets with several configurations (subsets): the one to load (`load_dataset(id, name)`).")
    image_column: str = _f("url", "CSV column holding the image path (or URL).")
    instruction_column: str = _f("instruction", "CSV column with the user's instruction.")
    response_column: str = _f("response", "CSV column with the target response.")
    query_column: str = _f("query", "Evaluation-CSV column used when `instruction_column` is absent.")
    annotation_column: str = _f("annotation", "Evaluation-CSV column used when `response_column` is absent.")
    image_root: Optional[str] = _f(None, "Folder relative image paths resolve against (else the data file's folder, then the working directory).")
    image_fallback_dir: Optional[str] = _f(None, "Without image_root: the folder relative image paths fall back to when they are not beside the data file (default: the working directory). A run's saved config.yaml records the original one, so it re-runs from any folder.")
    system_message: Optional[str] = _f(None, "System message put before every conversation built from a CSV row.")
    num_workers: int = _f(0, "DataLoader workers (seed default 4; 0 is fastest for tiny data).", ge=0)
    max_length: int = _f(2048, "Longest tokenized sample, image tokens included.", ge=1)
    on_overlength: Literal["skip", "error"] = _f("skip", "A sample longer than `max_length` is skipped (counted, warned) or is an error. Never truncated: that would cut image tokens.")
    on_bad_sample: Literal["error", "skip"] = _f("error", "A malformed row or image stops the run before training (error) or is skipped, logged and counted in metrics.json (skip).")
    allow_remote_images: bool = _f(False, "Fetch http(s):// image URLs (size-capped, with a timeout); off: remote URLs are an error.")
    remote_image_max_bytes: int = _f(20_000_000, "Largest remote image fetched, in bytes.", ge=1)
    remote_image_timeout: float = _f(20.0, "Seconds before a remote image fetch gives up.", gt=0)
    max_image_pixels: int = _f(89_478_485, "Largest image accepted, in pixels (width x height); a larger one is refused from its header, never decoded (decompression bombs, images far beyond what training uses). Default: PIL's bomb limit; at most twice it, where PIL itself refuses.",
                               ge=1, le=2 * 89_478_485)
    allow_absolute_paths: bool = _f(False, "Allow image paths outside their root (data.image_root, the data file's folder or the working directory): absolute paths and '..'.")


@dataclass
class ModelConfig:
    name: str = _f(help="Short name used in run directory names (`<name>__<variant>`).")
    hf_model_id: str = _f(help="Hub id, local directory, or `tiny:<family>` for an offline tiny model.")
    model_type: Optional[str] = _f(None, "Family key (`qwen_vl`, `qwen2_5_vl`, `llava`, ...). Derived from the model's config when omitted.")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = _f("auto", "Weight dtype: `auto` = bfloat16 on a GPU that has it, float32 otherwise.")
    min_pixels: Optional[int] = _f(None, "Qwen-VL dynamic resolution lower bound (pixels). Default 224*224.", ge=1)
    max_pixels: Optional[int] = _f(None, "Qwen-VL dynamic resolution upper bound (pixels), at least min_pixels. Default 224*224 (the seed's bound).", ge=1)
    image_processor: Optional[dict[str, Any]] = _f(None, "Image processor settings to override, e.g. {size: {longest_edge: 728}, do_image_splitting: false} for Idefics3/SmolVLM tiles (Qwen-VL: use min_pixels/max_pixels).")
    trust_remote_code: bool = _f(False, "Allow the model repository's own Python code to run (models that load through `AutoModelForCausalLM`/`AutoModel` with their own code, e.g. InternVL: docs/remote-code.md).")
    parts: Optional[dict[str, list[str]]] = _f(None, "Module paths of the model's parts, e.g. {vision: vision_model, projector: mlp1, llm: language_model} (a path or a list of paths each), where inspection cannot find them (remote code; `vlmtune inspect` lists what it found). Each named part replaces what the family or inspection found for it; a path the model does not have is an error.")
    load_in_4bit: bool = _f(False, "Load the LLM's linear layers in 4-bit NF4 (bitsandbytes, extra `quant`) for QLoRA; vision encoder, projector, LM head and every part trained `full` stay in full precision.")
    load_in_8bit: bool = _f(False, "Load the LLM's linear layers in 8-bit (bitsandbytes LLM.int8(), extra `quant`); the same parts stay in full precision as with `load_in_4bit`. Not together with `load_in_4bit`.")
    attn_implementation: Optional[str] = _f(None, "`eager`, `sdpa` or `flash_attention_2` (GPU extra).")


@dataclass
class LoraConfig:
    """One LoRA variant (also the shape of the top-level `lora:` defaults)."""

    name: Optional[str] = _f(None, "Variant name used in run directory names.")
    r: Optional[int] = _f(None, "LoRA rank (default 16).", ge=1)
    alpha: Optional[float] = _f(None, "LoRA alpha (default 2*r).", gt=0)
    dropout: Optional[float] = _f(None, "LoRA dropout (default 0.05).", ge=0, lt=1)
    target_modules: Optional[list[str]] = _f(None, "Leaf module names for the LLM part; null = the family default. Same as `llm_target_modules`.")
    llm_target_modules: Optional[list[str]] = _f(None, "LoRA targets inside the LLM (scoped: never wraps vision modules).")
    vision_target_modules: Optional[list[str]] = _f(None, "LoRA targets inside the vision encoder.")
    projector_target_modules: Optional[list[str]] = _f(None, "Seed 002: modules that always train fully, in every mode (e.g. multi_modal_projector, vision_embed_tokens), by module path or last name; saved in the adapter beside LoRA. A name that matches no module is an error. (The projector's own LoRA targets, when it trains with `lora`, are the family's.)")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases train with LoRA.")
    training: Optional[dict[str, Any]] = _f(None, "Training keys this variant overrides, e.g. {training_mode: both, learning_rate: 1e-4, parts: {vision: {train: full, lr_multiplier: 0.1}}}: ablate what trains, not only LoRA shape.")


@dataclass
class PartConfig:
    train: Optional[Literal["frozen", "lora", "full"]] = _f(None, "How this part trains; default from `training_mode`.")
    lr_multiplier: Optional[float] = _f(None, "This part's learning rate = training.learning_rate * lr_multiplier.", ge=0)


@dataclass
class StageConfig:
    """One stage of `training.stages` (seed 002: projector pretraining, then instruction
    tuning, then end to end). Unset keys keep the run's `training:` value."""

    name: str = _f(help="Stage name; the stage's folder is `<run>/stage_<i>_<name>/`.")
    training_mode: Optional[Literal["projector", "llm", "vision", "both"]] = _f(None, "What trains in this stage (see training.training_mode).")
    parts: Optional[dict[str, PartConfig]] = _f(None, "Per-part overrides for this stage (see training.parts).")
    learning_rate: Optional[float] = _f(None, "This stage's base learning rate.", gt=0)
    max_steps: Optional[int] = _f(None, "This stage's optimizer steps.", gt=0)
    num_train_epochs: Optional[float] = _f(None, "This stage's epochs (when max_steps is not set).", gt=0)
    lora: Optional[dict[str, Any]] = _f(None, "LoRA settings for this stage on top of the variant's, e.g. {r: 64, alpha: 128}.")


@dataclass
class VisualEncoderSettings:
    """Seed 000's visual encoder settings."""

    suppress_init_warnings: bool = _f(True, "Replace transformers' per-weight 'newly initialized' warnings by one summary line.")
    improve_initialization: bool = _f(False, "Re-initialise newly initialized weights with Xavier-uniform (biases zero).")
    freeze_visual_encoder: bool = _f(False, "Freeze the vision encoder whatever the training mode.")
    visual_learning_rate_multiplier: float = _f(0.1, "Vision encoder LR = learning_rate * this (seed 000: 1/10).", ge=0)


@dataclass
class TrainingConfig:
    # What trains (seed 002)
    training_mode: Literal["projector", "llm", "vision", "both"] = _f("llm", "projector: projector only (stage 1); llm: projector + LLM; vision: projector + vision; both: all three.")
    parts: dict[str, PartConfig] = _f(help="Per-part overrides: {vision|projector|llm: {train, lr_multiplier}}.", factory=dict)
    # Seed 003 keys
    num_train_epochs: float = _f(1.0, "Epochs over the training data.", gt=0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides epochs when > 0); -1: train for num_train_epochs.", gt=0, also=(-1,))
    per_device_train_batch_size: int = _f(1, "Training batch size per device.", ge=1)
    per_device_eval_batch_size: int = _f(1, "Evaluation batch size per device (eval loss and generation).", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = _f(5e-5, "Base learning rate (the LLM's); parts scale it by their lr_multiplier.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0)
    warmup_ratio: float = _f(0.0, "Fraction of steps for linear warmup.", ge=0, le=1)
    warmup_steps: int = _f(0, "Warmup steps (wins over warmup_ratio when > 0).", ge=0)
    lr_scheduler_type: str = _f("linear", "transformers scheduler name: linear, cosine, constant, constant_with_warmup, ...",
                                 choices=Choices("transformers `SchedulerType` name", _scheduler_names))
    optim: str = _f("adamw_torch", "transformers optimizer name: adamw_torch, adafactor, ...",
                     choices=Choices("transformers `OptimizerNames` name", _optimizer_names))
    logging_steps: int = _f(10, "Log train loss every N steps.", ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = _f("no", "When to compute eval loss on the validation split.")
    eval_steps: Optional[int] = _f(None, "Eval every N steps (eval_strategy: steps); default logging_steps.", ge=1)
    save_strategy: Literal["no", "steps", "epoch", "best"] = _f("epoch", "When to write checkpoints.")
    save_steps: int = _f(500, "Checkpoint every N steps (save_strategy: steps).", ge=1)
    save_total_limit: Optional[int] = _f(1, "Keep at most N checkpoints; null: keep all.", ge=1)
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
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0: no clipping (as in transformers).", ge=0)
    seed: int = _f(42, "Seed for init, shuffling and dropout.", ge=0, le=2**32 - 1)
    dataloader_num_workers: Optional[int] = _f(None, "Defaults to data.num_workers.", ge=0)
    report_to: Union[str, list[str]] = _f("none", "none, wandb, tensorboard, mlflow or a list of them (the `loggers` extra): loss, learning rate and eval loss while training, then the final and generation metrics and the config. Where each writes (in the run directory by default; wandb offline unless WANDB_MODE says otherwise): docs/loggers.md.",
                                         choices=Choices("transformers `report_to` integration (or none, all)", _report_to_names))
    run_name: Optional[str] = _f(None, "Tracker run name; default `<experiment>/<model>__<variant>`.")
    fsdp: Optional[str] = _f(None, "e.g. 'full_shard auto_wrap' (multi-process only).")
    fsdp_config: Optional[dict[str, Any]] = _f(None, "FSDP options (seed 001).")
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP: look for parameters without gradients.")
    resume: Literal["auto", "never"] = _f("auto", "auto: continue from the run's last checkpoint when there is one.")
    resume_from: Optional[str] = _f(None, "A checkpoint folder (`.../checkpoints/checkpoint-N`) to continue from instead of the run's newest one; one run only (`vlmtune train --resume-from`).")
    stages: Optional[list[StageConfig]] = _f(None, "Staged training: a list of stages run in order, each starting from the previous stage's weights (adapters merged between stages), e.g. [{name: projector, training_mode: projector}, {name: llm, training_mode: llm}].")
    deepspeed: Optional[str] = _f(None, "DeepSpeed config JSON (ZeRO-2/3) for multi-process training; needs the `deepspeed` extra.")
    # Throughput (issue #15)
    packing: bool = _f(False, "Padding-free packing: training samples are packed into rows of at most data.max_length tokens (image tokens counted), each attending only to itself (per-sample positions, Qwen's M-RoPE included). per_device_train_batch_size then counts packed rows. A family or attention backend that cannot pack gets one line and the padded path.")
    group_by_length: bool = _f(False, "Padded path: batch samples of similar length together (seeded, resumable), so less of each batch is padding.")
    lean_loss: bool = _f(True, "Compute the loss only at supervised positions, `loss_chunk_size` tokens at a time, never materialising full-vocabulary logits (Liger's fused kernel on a GPU when installed); false: the model's full logits.")
    loss_chunk_size: int = _f(128, "Tokens per chunk of the lean loss: peak logits memory is about loss_chunk_size x vocabulary x 4 bytes (128 x Qwen's 152k: 78 MB); larger chunks only make the head's matmuls bigger.", ge=1)
    nan_policy: Literal["stop", "skip_batch"] = _f("stop", "A NaN/inf loss stops training naming the step and samples, keeping the last good checkpoint (stop), or that batch is skipped and counted (skip_batch).")
    # Generation (used by evaluation)
    generation_max_new_tokens: int = _f(128, "Max new tokens per generated answer.", ge=1)
    generation_min_new_tokens: int = _f(0, "Min new tokens per generated answer (at most generation_max_new_tokens).", ge=0)
    generation_num_beams: int = _f(1, "Beam count (1 = greedy).", ge=1)
    generation_do_sample: bool = _f(False, "Sample instead of greedy/beam search.")
    generation_temperature: Optional[float] = _f(None, "Sampling temperature.", gt=0)
    generation_top_p: Optional[float] = _f(None, "Nucleus sampling p.", gt=0, le=1)


@dataclass
class EvaluationConfig:
    enabled: bool = _f(True, "false = train only.")
    split: Literal["test", "val"] = _f("test", "Which split to generate on (test falls back to val when absent).")
    max_samples: Optional[int] = _f(None, "Evaluate only the first N samples.", ge=1)
    batch_size: Optional[int] = _f(None, "Generation batch size; default training.per_device_eval_batch_size.", ge=1)
    metrics: Optional[list[str]] = _f(None, "Metric names (exact_match, exact_match_normalized, bleu4, rouge_l, meteor, cider, coco, vqa_accuracy, anls, relaxed_accuracy, cer, wer, token_stats); default exact_match, bleu4, meteor, rouge_l, cider, token_stats. Names are checked against the metric registry by `vlmtune check` and before a run starts.")


BUILTIN_REWARDS = ("exact_match", "normalized_match", "contains", "format", "numeric", "iou", "length_penalty")


@dataclass
class RewardConfig:
    """One reward of `grpo.rewards`: a built-in (`name`) or a user function (`function`)."""

    name: Optional[Literal["exact_match", "normalized_match", "contains", "format", "numeric", "iou", "length_penalty"]] = _f(
        None, "Built-in reward: exact_match, normalized_match (SQuAD normalisation), contains (the reference appears in the completion), format (the completion matches `pattern`), numeric (|number - reference| <= tolerance), iou (box IoU), length_penalty (minus the words past max_words, per max_words).")
    function: Optional[str] = _f(None, "A user reward `module.path:function`, called with (completions, references, samples) and returning one float per completion.")
    weight: float = _f(1.0, "This reward's weight in the total reward.")
    pattern: Optional[str] = _f(None, "format: the regular expression the whole completion must match, e.g. '<think>.*</think><answer>.*</answer>'.")
    tolerance: float = _f(0.0, "numeric: the largest absolute difference that still scores 1.", ge=0)
    max_words: int = _f(20, "length_penalty: words allowed before the penalty starts.", ge=1)


@dataclass
class GrpoConfig:
    """Seed 000's RL: GRPO on a VLM, with the same models, parts and LoRA settings as SFT."""

    init_from: Optional[str] = _f(None, "An SFT run directory to start from (its final/ weights); default: the model's base weights.")
    num_generations: int = _f(4, "Completions sampled per prompt (the group whose rewards are normalised together).", ge=2)
    prompts_per_step: int = _f(2, "Prompts per device per optimizer micro-batch (each gives num_generations completions).", ge=1)
    temperature: float = _f(1.0, "Sampling temperature.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling p.", gt=0, le=1)
    max_completion_length: int = _f(32, "Most new tokens per completion.", ge=1)
    beta: float = _f(0.04, "KL coefficient; 0 builds no reference policy.", ge=0)
    epsilon: float = _f(0.2, "Lower clipping range of the policy ratio.", gt=0)
    epsilon_high: Optional[float] = _f(None, "Upper clipping range (DAPO's clip-higher); default epsilon.", gt=0)
    num_iterations: int = _f(1, "Policy updates per generation batch (mu).", ge=1)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = _f("grpo", "How token losses are averaged: grpo (per sequence), bnpo (per token of the batch), dr_grpo (by a constant), dapo (per token of the global batch).")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "Divide advantages by the group's reward std (group), the batch's (batch), or not at all (none; Dr. GRPO).")
    rewards: list[RewardConfig] = _f(help="Rewards and their weights, e.g. [{name: exact_match}, {function: my_pkg.rewards:brevity, weight: 0.1}].",
                                     factory=lambda: [RewardConfig(name="exact_match")])
    probe_samples: int = _f(8, "Validation prompts (else training prompts) of the visual-reliance probe: the greedy reward with the real images vs. with them blanked, logged every training.eval_steps (default 50) and at the last step as visual_reliance/*; 0: off.", ge=0)


@dataclass
class ResourcesConfig:
    """What one run of the grid asks a cluster for (`vlmtune run --launcher ray`)."""

    gpus: Optional[float] = _f(None, "GPUs per run (Ray `num_gpus`; a fraction shares a GPU); default 1 when the cluster has GPUs, else 0.", ge=0)
    cpus: float = _f(1.0, "CPUs per run (Ray `num_cpus`).", ge=0)


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
    grpo: Optional[GrpoConfig] = _f(None, "Reinforcement learning (GRPO) instead of SFT: `vlmtune grpo CONFIG` (or `vlmtune run` with this section).")
    visual_encoder_settings: VisualEncoderSettings = _f(help="Seed 000 settings.", factory=VisualEncoderSettings)
    baseline: Optional[str] = _f(None, "Run compared against in ablation_summary.json: a variant name (per model) or a run name `<model>__<variant>`; default the first variant of each model.")
    resources_per_run: ResourcesConfig = _f(help="What each run asks a cluster for with `vlmtune run --launcher ray` (docs/distributed.md); the local launcher ignores it.", factory=ResourcesConfig)
    # Where the YAML lives; relative data paths fall back to this folder. Not a YAML key.
    config_dir: Optional[str] = field(default=None, repr=False, metadata={"internal": True})

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("results", self.experiment_name))

    def variants(self) -> list[LoraConfig]:
        """Every LoRA variant with the `lora:` defaults filled in (and the library defaults)."""
        # the default variant is named after its rank (`lora_r16`, or `lora.r`'s)
        raw = self.lora_variants or [LoraConfig(name=f"lora_r{self.lora.r or 16}")]
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

    def with_absolute_paths(self) -> "Config":
        """This config with every path absolute, resolved as this process reads them
        (`resolve_path`): the data files and data.image_root (working directory, then the config
        file's folder), output_dir (its default included), a local models[].hf_model_id and
        training.deepspeed (working directory). Without data.image_root, data.image_fallback_dir
        pins the folder relative image paths fall back to (the working directory). What a run's
        config.yaml holds (`train/rundir.py: resolved_run_config`), so `vlmtune train|preview
        RUN/config.yaml` re-runs from any folder. Idempotent: absolute paths stay as they are.
        Returns a new Config; sections without paths are shared with this one."""
        d, t = self.data, self.training

        def absolute(path: str, config_dir: Optional[str] = None) -> str:
            return os.path.abspath(resolve_path(path, config_dir))

        data = {k: absolute(getattr(d, k), self.config_dir) for k in DATA_FILE_KEYS if getattr(d, k)}
        # A *_file that exists here is a path; one that does not stays as written (a hub id).
        data.update({k: absolute(getattr(d, k), self.config_dir) for k in DATA_ANY_KEYS
                     if getattr(d, k) and resolve_path(getattr(d, k), self.config_dir).exists()})
        if d.image_root:
            data["image_root"] = absolute(d.image_root, self.config_dir)
        else:
            data["image_fallback_dir"] = absolute(d.image_fallback_dir or os.curdir)
        models = [dataclasses.replace(m, hf_model_id=absolute(m.hf_model_id)) if is_local_model_path(m.hf_model_id) else m for m in self.models]
        g = self.grpo
        if g is not None and g.init_from:
            g = dataclasses.replace(g, init_from=absolute(g.init_from))
        return dataclasses.replace(
            self, output_dir=os.path.abspath(self.resolved_output_dir()), data=dataclasses.replace(d, **data), models=models,
            training=dataclasses.replace(t, deepspeed=absolute(t.deepspeed)) if t.deepspeed else t, grpo=g)

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
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own error says what is wrong inside it
            return _coerce(value, members[0], path, src)
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


def _check_allowed(f: dataclasses.Field, value: Any, path: str, src: str) -> None:
    """Apply the field's `allowed` rule (from `_f`) to its parsed value: one line naming the
    key, the value, the allowed range and the fix. null (an Optional's default) always passes;
    a list is checked item by item."""
    rule = f.metadata.get("allowed")
    if rule is None or value is None:
        return
    for p, v in ([(f"{path}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(path, value)]):
        problem = rule.violation(v)
        if problem is None:
            continue
        if isinstance(rule, Choices):
            fix = rule.fix(v)
        elif f.default is not None and f.default is not dataclasses.MISSING and rule.violation(f.default) is None:
            fix = f"use a value {rule.describe()}, e.g. {f.default!r} (the default)"
        else:
            fix = f"use a value {rule.describe()}, or leave it out for the default"
        raise UserError(f"{src}: {p}" if src else p, problem, fix)


def check_setting(cls: type, name: str, value: Any, where: str) -> None:
    """Apply config field `cls.name`'s allowed range to a value given another way (a command
    line flag such as `vlmtune evaluate --num-beams`), so the rule stays in one place."""
    _check_allowed(next(f for f in dataclasses.fields(cls) if f.name == name), value, where, "")


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
        _check_allowed(fields[key], kwargs[key], kp, src)
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
        # Pixel bounds must be ordered; an omitted min_pixels means 224*224 (the families'
        # default), so a lone max_pixels below that is refused here, not at model load.
        if m.max_pixels is not None and (m.min_pixels or 224 * 224) > m.max_pixels:
            lo = f"min_pixels ({m.min_pixels})" if m.min_pixels is not None else f"the default min_pixels ({224 * 224})"
            raise UserError(f"{src}: models[{i}].max_pixels", f"{m.max_pixels} is less than {lo}",
                            "the pixel bounds must be ordered: set min_pixels <= max_pixels")
        if "__" in m.name or "/" in m.name:
            raise UserError(f"{src}: models[{i}].name", f"{m.name!r} contains '__' or '/'", "use a plain name: it becomes a folder name")
        for part, paths in (m.parts or {}).items():
            if part not in PARTS:
                near = difflib.get_close_matches(part, PARTS, n=1)
                raise UserError(f"{src}: models[{i}].parts.{part}", "unknown part", f"did you mean `{near[0]}`?" if near else "parts are vision, projector, llm")
            if not paths or not all(paths):
                raise UserError(f"{src}: models[{i}].parts.{part}", "no module path given", "name the part's module path(s), e.g. vision_model (see vlmtune inspect)")
    names = set()
    for i, v in enumerate(cfg.lora_variants):
        if not v.name:
            raise UserError(f"{src}: lora_variants[{i}].name", "missing", "give every variant a `name`")
        if v.name in names:
            raise UserError(f"{src}: lora_variants[{i}].name", f"duplicate variant name {v.name!r}", "give every variant a unique name")
        names.add(v.name)
    for v in cfg.variants():  # single-field ranges (r >= 1, ...) were checked by from_dict
        if v.training and variants:
            cfg.for_variant(v, src)  # its overrides must make a valid training section
    t = cfg.training
    for part, pc in t.parts.items():
        if part not in PARTS:
            near = difflib.get_close_matches(part, PARTS, n=1)
            raise UserError(f"{src}: training.parts.{part}", "unknown part", f"did you mean `{near[0]}`?" if near else "parts are vision, projector, llm")
    if t.generation_min_new_tokens > t.generation_max_new_tokens:
        raise UserError(f"{src}: training.generation_min_new_tokens", f"{t.generation_min_new_tokens} is more than generation_max_new_tokens ({t.generation_max_new_tokens})",
                        "lower generation_min_new_tokens or raise generation_max_new_tokens")
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
    if not (d.train_csv or d.train_jsonl or d.train_file):
        raise UserError(f"{src}: data", "no training data", "set data.train_file (any format), data.train_csv or data.train_jsonl")
    for split in ("train", "val", "test"):
        given = [k for k in (f"{split}_csv", f"{split}_jsonl", f"{split}_file") if getattr(d, k)]
        if len(given) > 1:
            raise UserError(f"{src}: data.{given[-1]}", f"both {given[0]} and {given[-1]} are set", f"keep one of them ({split}_file reads every format)")
    for key in d.columns or {}:
        if key not in DATA_COLUMN_KEYS:
            near = difflib.get_close_matches(key, DATA_COLUMN_KEYS, n=1)
            raise UserError(f"{src}: data.columns.{key}", "unknown field", f"did you mean `{near[0]}`?" if near else f"map one of {', '.join(DATA_COLUMN_KEYS)}")
    for key in d.splits or {}:
        if key not in ("train", "val", "test"):
            raise UserError(f"{src}: data.splits.{key}", "unknown split", "use train, val or test as keys, e.g. {val: validation}")
    ve = cfg.visual_encoder_settings
    vision_override = t.parts.get("vision")
    # `both` with a frozen encoder just means projector + LLM; only an explicit request to
    # train vision contradicts the freeze.
    if ve.freeze_visual_encoder and (t.training_mode == "vision" or (vision_override and vision_override.train not in (None, "frozen"))):
        raise UserError(f"{src}: visual_encoder_settings.freeze_visual_encoder", "true, but the config also asks the vision encoder to train", "set freeze_visual_encoder: false, or training_mode: llm")
    if cfg.grpo is not None:
        _validate_rewards(cfg.grpo.rewards, src)
    if t.resume_from and t.stages:
        raise UserError(f"{src}: training.resume_from", "not with training.stages (each stage resumes from its own checkpoints)", "drop resume_from: a rerun resumes each stage")
    return cfg


def _validate_rewards(rewards: list[RewardConfig], src: str) -> None:
    """Each reward names exactly one built-in or one `module.path:function`; what a built-in
    needs is there."""
    import re

    if not rewards:
        raise UserError(f"{src}: grpo.rewards", "no reward", "add at least one, e.g. [{name: exact_match}]")
    for i, r in enumerate(rewards):
        where = f"{src}: grpo.rewards[{i}]"
        if (r.name is None) == (r.function is None):
            raise UserError(where, "give exactly one of name (a built-in) or function (module.path:function)", f"built-ins: {', '.join(BUILTIN_REWARDS)}")
        if r.function is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", r.function):
            raise UserError(f"{where}.function", f"{r.function!r} is not module.path:function", "e.g. my_pkg.rewards:brevity")
        if r.name == "format":
            if not r.pattern:
                raise UserError(f"{where}.pattern", "the format reward needs a pattern", "e.g. pattern: '<answer>.*</answer>'")
            try:
                re.compile(r.pattern)
            except re.error as e:
                raise UserError(f"{where}.pattern", f"not a regular expression ({e})", "fix the pattern") from None


def seed_spellings(raw: Any, src: str = "config") -> Any:
    """`raw` (a config as read) with the seed documents' spellings moved to vlmtune's keys, one
    INFO line per spelling (the user learns the key to write; nothing is silently dropped):

    - seed 000: `use_lora`, `lora_rank`, `lora_alpha`, `lora_target_modules` (top level or
      under `training`) -> `lora.r` / `lora.alpha` / `lora.llm_target_modules`; `use_lora:
      false` -> the LLM trains fully; `mixed_precision: true|false` -> `bf16` / `no`;
      `load_in_4bit` and `gradient_checkpointing` at the top level -> every model's /
      `training.`; `model_settings.vlm_training.visual_encoder_settings` ->
      `visual_encoder_settings`;
    - seed 001: `dataset_text_field`, `dataset_kwargs` (TRL SFTConfig arguments) are accepted
      and have no effect: vlmtune renders and labels conversations itself.

    A spelling that collides with its vlmtune key set to another value is one error line."""
    if not isinstance(raw, dict):
        return raw
    out = copy.deepcopy(raw)
    notes: list[str] = []

    def move(section: dict[str, Any], key: str, dest: tuple[str, ...], value: Any, where: str) -> None:
        node = out
        for k in dest[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise UserError(f"{src}: {'.'.join(dest[:-1])}", "is not a mapping", "write it as a mapping of keys")
            node = node[k]
        if node is section and key == dest[-1]:  # the same key, a seed value (mixed_precision: true)
            section[key] = value
            notes.append(f"{where} -> {'.'.join(dest)}: {value}")
            return
        if dest[-1] in node and node[dest[-1]] != value:
            raise UserError(f"{src}: {where}", f"the seed spelling says {value!r} but {'.'.join(dest)} says {node[dest[-1]]!r}",
                            f"keep only {'.'.join(dest)}")
        node[dest[-1]] = value
        section.pop(key)
        notes.append(f"{where} -> {'.'.join(dest)}")

    sections = [(out, "")] + ([(out["training"], "training.")] if isinstance(out.get("training"), dict) else [])
    for sec, prefix in sections:
        if "use_lora" in sec:
            if sec["use_lora"] is False:
                move(sec, "use_lora", ("training", "parts", "llm", "train"), "full", f"{prefix}use_lora: false")
            else:
                sec.pop("use_lora")
                notes.append(f"{prefix}use_lora: true is the default (the LLM trains with LoRA)")
        for key, dest in (("lora_rank", "r"), ("lora_alpha", "alpha"), ("lora_target_modules", "llm_target_modules")):
            if key in sec:
                move(sec, key, ("lora", dest), sec[key], f"{prefix}{key}")
        if isinstance(sec.get("mixed_precision"), bool):
            move(sec, "mixed_precision", ("training", "mixed_precision"), "bf16" if sec["mixed_precision"] else "no",
                 f"{prefix}mixed_precision: {str(sec['mixed_precision']).lower()}")
        for key in ("dataset_text_field", "dataset_kwargs"):
            if key in sec:
                sec.pop(key)
                notes.append(f"{prefix}{key} has no effect (vlmtune renders and labels conversations itself)")
    if "gradient_checkpointing" in out:
        move(out, "gradient_checkpointing", ("training", "gradient_checkpointing"), out["gradient_checkpointing"], "gradient_checkpointing")
    if "load_in_4bit" in out:
        value = out.pop("load_in_4bit")
        for m in out.get("models") or []:
            if isinstance(m, dict):
                m.setdefault("load_in_4bit", value)
        notes.append("load_in_4bit -> models[].load_in_4bit")
    ms = out.get("model_settings")
    if isinstance(ms, dict) and isinstance(ms.get("vlm_training"), dict) and "visual_encoder_settings" in ms["vlm_training"]:
        vt = ms["vlm_training"]
        move(vt, "visual_encoder_settings", ("visual_encoder_settings",), vt["visual_encoder_settings"], "model_settings.vlm_training.visual_encoder_settings")
        if not vt:
            ms.pop("vlm_training")
        if not ms:
            out.pop("model_settings")
    for n in notes:
        log.info("%s: seed spelling %s", src, n)
    return out


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None, sets: Optional[list[str]] = None) -> Config:
    """Read, validate and return the config at `path` (safe YAML loader). `overrides` are
    deep-merged in and `sets` (`--set key.path=value`, see `apply_sets`) applied, both before
    validation."""
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
    if sets:
        raw = apply_sets(raw, sets)
        src = src if src.endswith("(with --set)") else f"{src} (with --set)"
    cfg = from_dict(Config, seed_spellings(raw, src), "", src)
    cfg.config_dir = str(p.resolve().parent)
    return validate(cfg, src)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, merging nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_sets(raw: Optional[dict[str, Any]], pairs: list[str]) -> dict[str, Any]:
    """`raw` (a config as read from YAML, not changed) with each `key.path=value` of `pairs`
    applied in order; values are YAML. A path reaches every key: mappings by key (missing
    sections are started), lists by index (`models.0.hf_model_id`, `lora_variants.1.r`), so
    one list item changes and the others stay. Unknown keys are left to `from_dict`, which
    names them with a did-you-mean; a path that cannot be walked is one line naming the
    `--set` and the valid indices or keys."""
    out: dict[str, Any] = copy.deepcopy(raw) if raw else {}
    for pair in pairs:
        where = f"--set {pair}"
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise UserError(where, "expected key.path=value", "e.g. --set training.max_steps=10 or --set models.0.hf_model_id=tiny:llava")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(where, f"the value is not valid YAML ({getattr(e, 'problem', e)})", "quote the value, e.g. --set 'key=\"a: b\"'") from None
        node: Any = out
        tp: Any = Config  # the schema type at `node`: names the valid keys in errors
        for depth, part in enumerate(parts):
            here, rest = ".".join(parts[:depth]) or "(top level)", parts[depth + 1:]
            if isinstance(node, list):
                slot: Any = _list_index(node, part, here, rest, where)
                tp = _unwrap(typing.get_args(tp)[0]) if typing.get_origin(tp) is list else Any
            elif isinstance(node, dict):
                keys = [f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")] if dataclasses.is_dataclass(tp) else list(node)
                if part.isdigit() and part not in node and part not in keys:
                    raise UserError(where, f"{here} is a mapping, not a list: there is no item {part}", f"use a key: {', '.join(keys) or '(none yet)'}")
                slot = part
                tp = (_unwrap(typing.get_type_hints(tp).get(part, Any)) if dataclasses.is_dataclass(tp)
                      else _unwrap(typing.get_args(tp)[1]) if typing.get_origin(tp) is dict else Any)
            else:
                raise UserError(where, f"{here} is {node!r}, not a mapping or a list", f"set {here} itself: --set {here}=VALUE")
            if not rest:
                node[slot] = value
                break
            child = node[slot] if isinstance(node, list) else node.get(slot)
            if child is None:
                # A section the file leaves out (or leaves empty, `training:`) starts here; a
                # list cannot be started by indexing into it.
                if rest[0].isdigit() and not (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
                    path = ".".join(parts[: depth + 1])
                    raise UserError(where, f"{path} is not in the config: there is no item {rest[0]}", f"write the list in the config file, or set it whole: --set {path}='[...]'")
                child = node[slot] = {}
            node = child
    return out


def _list_index(node: list[Any], part: str, here: str, rest: list[str], where: str) -> int:
    """The list index `part` names in `node` (`here` in the config), or one line saying which
    indices there are."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    if not node:
        raise UserError(where, f"{here} is an empty list: there is no item {part}", f"write the items in the config file, or set the list whole: --set {here}='[...]'")
    numeric = part.lstrip("-").isdigit()
    what = f"there is no item {part}" if numeric else f"{part!r} is not an index"
    # `models.name=x` means a key of an item: show it under an index.
    example = ".".join([here, "0", *([] if numeric else [part]), *rest])
    raise UserError(where, f"{here} is a list of {len(node)}: {what}", f"use an index 0..{len(node) - 1}, e.g. --set {example}=...")


def _unwrap(tp: Any) -> Any:
    """`Optional[X]` -> X (the schema type a value stands for when it is not null)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def config_from_dict(raw: dict[str, Any], src: str = "config", config_dir: Optional[str] = None) -> Config:
    cfg = from_dict(Config, seed_spellings(raw, src), "", src)
    cfg.config_dir = config_dir
    return validate(cfg, src)


def describe_keys() -> str:
    """Markdown reference of every config key, generated from the dataclasses' help text."""
    lines = ["# Config reference", "", "Generated from `src/vlmtune/config.py` (`python -m vlmtune.config > docs/config.md`).", ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        lines.extend([f"## `{prefix or '(top level)'}`", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"])
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
            rule = f.metadata.get("allowed")
            allowed = rule.describe() if rule is not None else ""
            lines.append(f"| `{f.name}` | {_type_name(tp).replace(' | ', ' or ')} | {default} | {allowed} | {f.metadata.get('help', '')} |")
        lines.append("")
        for sub, name, is_list in nested:
            section(sub, name + ("[]" if is_list else ""))

    section(Config, "")
    lines += ["`training.parts.<vision|projector|llm>` take:", ""]
    section(PartConfig, "training.parts.<part>")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_keys())

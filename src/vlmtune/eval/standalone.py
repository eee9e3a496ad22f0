"""`vlmtune evaluate` and `vlmtune score`: evaluation outside a training config (seed 003's
`vlm_evaluate.py`).

    vlmtune evaluate --run RUN_DIR --csv test.csv [--output-dir DIR]
    vlmtune evaluate --model-id ID [--lora-path P] [--model-type T] --csv test.csv
    vlmtune score predictions.jsonl [--metrics a,b] [--output F.json]

A run directory is what `vlmtune train` wrote: its `config.yaml` names the base model and the
generation settings used after training, `final/` holds the merged model and `lora_adapter/`
the adapter. Either gives the same weights; `final/` is preferred (one load, no merge).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, DataConfig, ModelConfig, config_from_dict
from ..data.collate import Encoder
from ..data.sources import Sample, jsonl_lines, load_data_file
from ..errors import UserError
from ..io import atomic_write_json
from ..train.rundir import RunDir
from .generate import GenerationSettings, PromptStyle, describe_weights

log = logging.getLogger("vlmtune")


@dataclass
class EvalModel:
    model: torch.nn.Module
    encoder: Encoder
    desc: str
    """Identifies the weights (for resuming predictions safely)."""
    run_config: Optional[Config] = None


def read_run_config(run_dir: Path) -> Config:
    import yaml

    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(str(run_dir), "not a vlmtune run directory (no config.yaml)", "pass the folder `vlmtune train` made, e.g. results/<experiment>/<model>__<variant>")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"unreadable ({type(e).__name__})", "the run's config.yaml is damaged; retrain or restore it") from None
    return config_from_dict(raw, str(path), str(run_dir))


def find_run_dir(run: str, where: str = "--run") -> Path:
    """A run directory, or a run name (`<model>__<variant>`) found under ./results/*/."""
    p = Path(run)
    if p.is_dir():
        return p
    if "/" not in run:
        hits = sorted(Path("results").glob(f"*/{run}"))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UserError(where, f"{run!r} names several runs: {', '.join(map(str, hits))}", "pass the run directory")
    raise UserError(where, f"run directory {run!r} not found", "pass the folder `vlmtune train` made (results/<experiment>/<model>__<variant>)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _with_adapter(base: torch.nn.Module, adapter: Path, where: str) -> torch.nn.Module:
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(where, f"{adapter} holds no adapter_config.json", "pass the lora_adapter/ folder a run wrote")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(where, f"{adapter} has no adapter_model.safetensors (pickled adapters are not loaded: unpickling can run code)", "save the adapter with safetensors (peft's default)")
    try:
        return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(where, f"adapter {adapter} does not fit this base model ({str(e).splitlines()[0][:160]})", "pass the base model the adapter was trained on (--model-id)") from None


def load_run(run_dir: Path, weights: str = "auto", dtype: Optional[str] = None, device: Optional[str] = None) -> EvalModel:
    """A run's model: `final/` or `lora_adapter/` merged onto its base (`weights`), in the
    run's `torch_dtype` unless `dtype` names one, on the GPU when there is one unless `device`."""
    from ..models.loading import load_model

    cfg = read_run_config(run_dir)
    # A QLoRA run trained on a 4/8-bit base, but its final/ is full precision and its adapter
    # belongs on the full-precision base: merging into quantized weights would round it away.
    mcfg = dataclasses.replace(cfg.models[0], load_in_4bit=False, load_in_8bit=False, **({"torch_dtype": dtype} if dtype else {}))
    final, adapter = RunDir(run_dir).final, RunDir(run_dir).lora_adapter
    use_final = weights == "final" or (weights == "auto" and (final / "config.json").is_file())
    if use_final:
        if not (final / "config.json").is_file():
            raise UserError("--weights final", f"{final} holds no model", "use --weights adapter, or train the run to the end")
        lm = load_model(dataclasses.replace(mcfg, hf_model_id=str(final)), cfg.visual_encoder_settings, "--run")
        model, desc = lm.model, describe_weights(final)
    else:
        if not adapter.is_dir():
            raise UserError("--run", f"{run_dir} has neither final/ nor lora_adapter/", "the run did not finish training; rerun `vlmtune train`")
        # The adapter's own base: a staged run's last stage and a GRPO run with init_from trained
        # theirs on an earlier run's merged final/, not on the configured model.
        try:
            base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        if base and Path(base).is_dir():
            mcfg = dataclasses.replace(mcfg, hf_model_id=base)
        lm = load_model(mcfg, cfg.visual_encoder_settings, "--run")
        model, desc = _with_adapter(lm.model, adapter, "--run"), describe_weights(adapter)
    return EvalModel(model.to(torch.device(device) if device else _device()), Encoder(lm.processor, lm.family), desc, cfg)


def load_model_id(model_id: str, lora_path: Optional[str], model_type: Optional[str], dtype: str = "auto",
                  trust_remote_code: bool = False, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> EvalModel:
    from ..models.loading import load_model

    mcfg = ModelConfig(name="eval", hf_model_id=model_id, model_type=model_type, torch_dtype=dtype,
                       trust_remote_code=trust_remote_code, min_pixels=min_pixels, max_pixels=max_pixels)
    lm = load_model(mcfg, where="--model-id")
    model, desc = lm.model, model_id
    if lora_path:
        adapter = Path(lora_path)
        if not adapter.is_dir():
            raise UserError("--lora-path", f"{lora_path!r} not found", "pass the lora_adapter/ folder of a run")
        model, desc = _with_adapter(model, adapter, "--lora-path"), f"{model_id} + {describe_weights(adapter)}"
    return EvalModel(model.to(_device()), Encoder(lm.processor, lm.family), desc)


def eval_data_config(image_column: str, query_column: Optional[str], annotation_column: Optional[str], image_root: Optional[str],
                     allow_absolute_paths: bool = False, allow_remote_images: bool = False) -> DataConfig:
    """Seed 003's evaluation CSV (url, query, annotation); a training-style CSV (instruction,
    response) also works unless columns are named explicitly."""
    return DataConfig(
        image_column=image_column,
        instruction_column=query_column or "query", query_column=query_column or "instruction",
        response_column=annotation_column or "annotation", annotation_column=annotation_column or "response",
        image_root=image_root, allow_absolute_paths=allow_absolute_paths, allow_remote_images=allow_remote_images,
    )


def load_eval_samples(path: str, data: DataConfig, where: str, fmt: Optional[str] = None) -> list[Sample]:
    """Evaluation samples of a data file in any format (told by the extension and content
    unless `fmt`), images checked as before training."""
    from ..data.check import check_images, refuse

    samples = load_data_file(path, data, where, fmt)
    if not samples:
        raise UserError(path, "no samples", "add rows")
    # The same gate as training: every image header read before the model loads.
    _, problems = check_images(samples, full_decode=False, image_column=data.image_column)
    if problems:
        raise refuse(problems)
    return samples


def settings_from(cfg: Optional[Config], overrides: dict[str, Any]) -> GenerationSettings:
    """The run's own generation settings (if any), with command-line overrides on top."""
    base = GenerationSettings.from_training(cfg.training) if cfg is not None else GenerationSettings()
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def prompt_style(cfg: Optional[Config], template: Optional[str], system_message: Optional[str]) -> PromptStyle:
    """How `evaluate` and `chat` turn a sample into a prompt: `--prompt-template` (a typed
    `\\n` is a newline) and `--system-message`, which defaults to the run's own
    `data.system_message` when `cfg` is a run's config.

    Inside `vlmtune run` the data loader puts that system message first in every conversation
    that has none of its own, and evaluation renders the samples as they are. Here the data file
    is read without the run's config, so the prompt adds it (`build_prompt`, likewise only where
    a sample has no system turn): the same prompt tokens as the run's own evaluation.
    """
    system = system_message or (cfg.data.system_message if cfg is not None else None)
    return PromptStyle(template.replace("\\n", "\n") if template else None, system)


# ------------------------------------------------------------------------------------------
# `vlmtune score`


def read_predictions(path: str) -> list[dict[str, Any]]:
    """predictions.jsonl records, each checked: `prediction` (str) and `references` (non-empty list of str)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(path, "file not found", "pass a predictions.jsonl written by `vlmtune evaluate` (or one line per sample with prediction and references)")
    out = []
    for where, rec in jsonl_lines(p):
        if isinstance(rec, UserError):
            raise rec
        if not isinstance(rec, dict):
            raise UserError(where, "a line must be a JSON object", 'write {"prediction": "...", "references": ["..."]}')
        if not isinstance(rec.get("prediction"), str):
            raise UserError(f"{where}: prediction", "missing or not a string", "give every line a prediction string (empty is fine)")
        refs = rec.get("references")
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{where}: references", "must be a non-empty list of strings", 'write "references": ["a red circle"]')
        out.append({**rec, "references": refs})
    if not out:
        raise UserError(path, "no predictions", "the file is empty")
    return out


def score_file(path: str, metric_names: Optional[list[str]], output: Optional[str], tokenizer_id: Optional[str] = None) -> dict[str, Any]:
    from .generate import score_records

    records = read_predictions(path)
    tokenizer = None
    if tokenizer_id:
        from transformers import AutoTokenizer

        from ..models.loading import resolve_model_path

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_id))
        except (OSError, ValueError) as e:
            raise UserError("--tokenizer", f"cannot load {tokenizer_id!r} ({str(e).splitlines()[0][:120]})", "pass a model id or directory with a tokenizer") from None
    result = score_records(records, metric_names, tokenizer)
    result["source"] = str(path)
    if output:
        atomic_write_json(Path(output), result)
    return result


def format_scores(result: dict[str, Any]) -> str:
    """One line per metric: value [lo, hi]."""
    lines = []
    for name, e in result.items():
        if not isinstance(e, dict) or "value" not in e:
            continue
        v, ci = e["value"], e.get("ci95")
        if v is None:
            lines.append(f"  {name:<24} n/a ({e.get('reason', '')})")
        elif isinstance(v, dict):
            for k, x in v.items():
                c = (ci or {}).get(k)
                lines.append(f"  {name + '.' + k:<24} {x:.4f}" + (f"  [{c[0]:.4f}, {c[1]:.4f}]" if c else ""))
        else:
            lines.append(f"  {name:<24} {v:.4f}" + (f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    return "\n".join(lines)

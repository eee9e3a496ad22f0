"""`vlmtune export RUN_DIR --to DIR [--dtype bfloat16] [--push-to-hub REPO]`: a run's model as
one folder that transformers, vLLM and the hub take as it is.

    DIR/
        config.json, model*.safetensors    the merged weights (final/, or lora_adapter/
                                           merged onto the run's base), cast to --dtype
        generation_config.json             the run's generation settings and end tokens: a
                                           plain `generate` decodes like `vlmtune evaluate`
        processor / tokenizer files, chat_template.jinja
        preprocessor_config.json           the image processor again, in the layout
                                           AutoProcessor falls back to when a family's processor
                                           also wants a video processor and none was saved
        README.md                          the model card: base model, data, what trained,
                                           metrics, how to load it

The folder is built beside DIR and renamed into place (`train.rundir.save_dir_atomically`):
a kill leaves no half-written export, and `--force` replaces an old one only once the new one
is complete. `--push-to-hub` then uploads that folder (`HfApi.upload_folder`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..config import Config
from ..errors import UserError
from ..eval.generate import GenerationSettings, generation_defaults
from ..eval.standalone import find_run_dir, load_run, read_run_config, settings_from
from ..models.processors import save_processor
from ..train.rundir import RunDir, check_writable, recover_swapped_dir, save_dir_atomically

log = logging.getLogger("vlmtune")

DTYPES = ("float32", "float16", "bfloat16")
MODEL_CARD = "README.md"


@dataclasses.dataclass
class ExportResult:
    path: Path
    run: Path
    source: str
    """"final/" or "lora_adapter/ + base" (what the weights came from)."""
    dtype: str
    n_parameters: int
    size_bytes: int
    url: Optional[str] = None
    """The hub repository's address after `--push-to-hub`."""


def export_run(run: str, to: str, dtype: Optional[str] = None, force: bool = False, push_to_hub: Optional[str] = None,
               private: bool = False, weights: str = "auto") -> ExportResult:
    """Write run `run`'s merged model, processor, generation config and model card to `to`;
    then upload the folder to the hub repository `push_to_hub` when given."""
    run_dir = find_run_dir(run, "export")
    rd = RunDir(run_dir)
    cfg = read_run_config(run_dir)  # one line for a folder that is not a run
    if not rd.has_model() and not rd.lora_adapter.is_dir():
        raise UserError("export", f"{run_dir} has neither final/ nor lora_adapter/", "the run did not finish training; rerun `vlmtune train` on its config.yaml")
    if dtype is not None and dtype not in DTYPES:
        raise UserError("--dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    dest = _check_destination(Path(to), run_dir, force)
    token = _check_hub(push_to_hub) if push_to_hub else None

    use_final = weights == "final" or (weights == "auto" and rd.has_model())
    source = "final/" if use_final else "lora_adapter/ + base"
    load_dtype = _saved_dtype(rd.final if use_final else None) or cfg.models[0].torch_dtype
    steps = ["load" if use_final else "load + merge", *(["cast"] if dtype and dtype != load_dtype else []), "save weights", "save processor", "model card"]
    with _Steps(steps, f"export {rd.name}") as step:
        step("load" if use_final else "load + merge")
        em = load_run(run_dir, weights, dtype=None if load_dtype == "auto" else load_dtype, device="cpu")
        model, encoder = em.model, em.encoder
        if dtype and dtype != load_dtype:
            import torch

            step("cast")
            model = model.to(getattr(torch, dtype))
        out_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        settings = settings_from(cfg, {})

        def save(tmp: Path) -> None:
            step("save weights")
            model.generation_config.update(**generation_defaults(encoder, settings))
            model.generation_config._from_model_config = False  # explicit settings now: transformers must not rebuild them from config.json
            model.save_pretrained(tmp)
            step("save processor")
            save_processor(encoder.processor, encoder.family, tmp)  # the same files a run's final/ holds
            step("model card")
            (tmp / MODEL_CARD).write_text(model_card(cfg, rd, source, out_dtype, settings, push_to_hub or dest.name), encoding="utf-8")

        save_dir_atomically(dest, save)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    result = ExportResult(dest, run_dir, source, out_dtype, n_params, size)
    if push_to_hub:
        result.url = push_folder(dest, push_to_hub, token, private, f"vlmtune export of run {rd.name}")
    return result


def _saved_dtype(folder: Optional[Path]) -> Optional[str]:
    """The dtype a model folder's config.json records (None: not recorded or not a float dtype)."""
    if folder is None:
        return None
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return found if found in DTYPES else None


def _check_destination(dest: Path, run_dir: Path, force: bool) -> Path:
    dest = dest.expanduser().resolve()
    run = run_dir.resolve()
    if dest == run or run.is_relative_to(dest) or dest.is_relative_to(run):
        raise UserError("--to", f"{dest} overlaps the run directory {run}", "export to a folder outside the run, e.g. exports/" + run.name)
    recover_swapped_dir(dest)  # an earlier export killed while swapping in: back in place, then judged like any other
    if dest.exists() and not dest.is_dir():
        raise UserError("--to", f"{dest} is a file", "choose a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not force:
            raise UserError("--to", f"{dest} exists and is not empty", "pass --force to replace it, or choose another folder")
        if not (dest / "config.json").is_file():
            # --force swaps the whole folder away: only ever an earlier export, never a folder of other files
            raise UserError("--to", f"{dest} holds files but no model (no config.json)", "--force only replaces an earlier export; choose another folder")
    check_writable(dest.parent, "--to")
    return dest


# ------------------------------------------------------------------------------------------
# the hub


def _check_hub(repo: str) -> str:
    """The token to push with, checked (with the repository id) before any weights load."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError("--push-to-hub", f"{repo!r} is not a repository id ({str(e).splitlines()[0][:120]})", "write it as user/name or org/name") from None
    if "/" not in repo:
        raise UserError("--push-to-hub", f"{repo!r} names no owner", "write it as user/name or org/name")
    token = huggingface_hub.get_token()
    if not token:
        raise UserError("--push-to-hub", "no Hugging Face token", "run `hf auth login` or set HF_TOKEN (a token with write access)")
    return token


def push_folder(folder: Path, repo: str, token: str, private: bool, message: str) -> str:
    """Create `repo` (if needed) and upload `folder` to it as one commit; returns its address."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    log.info("pushing %s to the hub repository %s", folder, repo)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", commit_message=message)
    except Exception as e:  # network, auth, permissions, offline mode: all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError("--push-to-hub", f"upload to {repo} failed ({type(e).__name__}: {first})",
                        f"the export in {folder} is complete; retry with `hf upload {repo} {folder}`") from e
    return str(getattr(url, "url", None) or f"https://huggingface.co/{repo}")


# ------------------------------------------------------------------------------------------
# the model card


def _is_hub_id(model_id: str) -> bool:
    """A hub repository id (`org/name`), not a local folder or a tiny: model."""
    return model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")) and ":" not in model_id and not Path(model_id).exists()


def _data_name(raw: str) -> str:
    """A data file's name without the local folders it sat in (hub dataset ids as they are)."""
    p = Path(raw)
    return p.name if p.is_absolute() or p.exists() else raw


def _num(x: Any, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _data_rows(cfg: Config, metrics: dict[str, Any], gen: dict[str, Any]) -> list[str]:
    rows = []
    d = cfg.data
    for split in ("train", "val", "test"):
        key = next((k for k in (f"{split}_file", f"{split}_csv", f"{split}_jsonl") if getattr(d, k)), None)
        if key is None:
            continue
        n = "n/a"
        if split == "train" and isinstance(metrics.get("n_train_samples"), int):
            n = str(metrics["n_train_samples"])
        elif split == cfg.evaluation.split and isinstance(gen.get("n_samples"), int):
            n = f"{gen['n_samples']} evaluated"
        rows.append(f"| {split} | `{_data_name(getattr(d, key))}` (data.{key}) | {n} |")
    return rows


def _plan_rows(report: dict[str, Any]) -> list[str]:
    plan, parts = report.get("plan") or {}, report.get("parts") or {}
    rows = []
    for part in ("vision", "projector", "llm"):
        p, n = plan.get(part) or {}, parts.get(part) or {}
        if not p and not n:
            continue
        rows.append(f"| {part} | {p.get('train', 'n/a')} | {n.get('trainable', 0):,} / {n.get('total', 0):,} | {_num(p.get('lr_multiplier'), 'g')} |")
    return rows


def _metric_rows(gen: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in gen.items():
        if not isinstance(e, dict) or "value" not in e:
            continue
        v, ci = e["value"], e.get("ci95")
        if isinstance(v, dict):
            for k, x in v.items():
                c = (ci or {}).get(k) if isinstance(ci, dict) else None
                rows.append(f"| {name}.{k} | {_num(x)} | {f'[{c[0]:.4f}, {c[1]:.4f}]' if c else ''} |")
        else:
            rows.append(f"| {name} | {_num(v)} | {f'[{ci[0]:.4f}, {ci[1]:.4f}]' if isinstance(ci, list) and len(ci) == 2 else e.get('reason', '')} |")
    return rows


def _read(path: Path, reader: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return reader() if path.is_file() else {}
    except (OSError, ValueError):
        log.warning("%s is unreadable: the model card leaves it out", path)
        return {}


def model_card(cfg: Config, rd: RunDir, source: str, dtype: str, settings: GenerationSettings, load_name: str) -> str:
    """The exported folder's README.md: YAML front matter for the hub, then base model, data,
    what trained, metrics and how to load it, from the run's own files."""
    m, v, t = cfg.models[0], cfg.lora_variants[0], cfg.training
    metrics = _read(rd.metrics, rd.read_metrics)
    gen = _read(rd.generation_metrics, rd.read_generation_metrics)
    report = _read(rd.parameter_report, rd.read_parameter_report)
    plan = report.get("plan") or {}
    uses_lora = any((p or {}).get("train") == "lora" for p in plan.values())
    family = report.get("family")
    front: dict[str, Any] = {}
    if _is_hub_id(m.hf_model_id):
        front["base_model"] = m.hf_model_id
    front.update({"library_name": "transformers", "pipeline_tag": "image-text-to-text",
                  "tags": ["vlmtune", "image-text-to-text", *(["lora"] if uses_lora else []), *([family] if family and family != "generic" else [])]})
    recipe = "GRPO" if cfg.grpo is not None else "supervised fine-tuning"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {load_name}", "",
        f"Fine-tuned from **{m.hf_model_id}** with vlmtune ({recipe}; run `{rd.name}` of experiment `{cfg.experiment_name}`). "
        f"Exported from the run's {source} as one merged model in {dtype}: no adapter to apply.", "",
        "## Data", "", "| split | source | samples |", "|---|---|---|", *_data_rows(cfg, metrics, gen), "",
        "## What trained", "",
        f"training_mode `{t.training_mode}`" + (f"; LoRA r={v.r}, alpha={v.alpha:g}, dropout={v.dropout:g}" if uses_lora and v.r else "")
        + (f", targets {', '.join(v.target_modules)}" if uses_lora and v.target_modules else "") + ".", "",
    ]
    if (rows := _plan_rows(report)):
        lines += ["| part | trained | trainable / total parameters | lr multiplier |", "|---|---|---|---|", *rows, ""]
    if report.get("trainable_parameters") is not None:
        lines += [f"{report['trainable_parameters']:,} of {report.get('total_parameters', 0):,} parameters trained ({_num(report.get('trainable_percent'), '.2f')}%).", ""]
    if t.stages:
        lines += ["Stages, in order: " + ", ".join(f"`{s.name}` ({s.training_mode or t.training_mode})" for s in t.stages) + ".", ""]
    lines += [f"Learning rate {t.learning_rate:g}, batch {t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation"
              f" x {metrics.get('world_size', 1)} device(s), {metrics.get('global_step', 'n/a')} steps, seed {t.seed}.", ""]
    lines += ["## Metrics", "",
              f"Training: final train loss {_num(metrics.get('final_train_loss'))}, final eval loss {_num(metrics.get('final_eval_loss'))}, "
              f"{_num(metrics.get('tokens_seen'), ',')} tokens seen, {_num(metrics.get('train_seconds'), '.1f')} s.", ""]
    if gen:
        how = "greedy" if not settings.do_sample else f"sampling (temperature {settings.temperature}, top_p {settings.top_p})"
        lines += [f"Evaluation on the {cfg.evaluation.split} split ({gen.get('n_samples', 'n/a')} samples; {how}, num_beams {settings.num_beams}, "
                  f"max_new_tokens {settings.max_new_tokens}; 95% bootstrap intervals):", "",
                  "| metric | value | 95% CI |", "|---|---|---|", *_metric_rows(gen), ""]
    else:
        lines += ["No evaluation was recorded for this run (`vlmtune evaluate --run` adds one).", ""]
    lines += [
        "## Use it", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
        f'model = AutoModelForImageTextToText.from_pretrained("{load_name}")',
        f'processor = AutoProcessor.from_pretrained("{load_name}")', "```", "",
        "`generation_config.json` holds the settings the metrics above were generated with. With vlmtune: "
        f'`vlmtune chat {load_name} --image photo.jpg "What is in the picture?"`; with vLLM: `vllm serve {load_name}`.', "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# progress


class _Steps:
    """A progress bar over export's steps (elapsed time, and tqdm's estimate of the rest).
    Off with VLMTUNE_NO_PROGRESS=1; steps are logged either way."""

    def __init__(self, steps: list[str], desc: str):
        self.steps, self.desc, self.bar, self.done = steps, desc, None, -1

    def __enter__(self) -> Callable[[str], None]:
        if os.environ.get("VLMTUNE_NO_PROGRESS") != "1":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.steps), desc=self.desc, unit="step", dynamic_ncols=True)
        return self.step

    def step(self, name: str) -> None:
        log.debug("export: %s", name)
        if self.bar is not None:
            if self.done >= 0:
                self.bar.update(1)
            self.bar.set_postfix_str(name, refresh=True)
        self.done += 1

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            if exc[0] is None:
                self.bar.update(len(self.steps) - self.bar.n)
            self.bar.close()

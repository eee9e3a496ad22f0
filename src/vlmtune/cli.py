"""The `vlmtune` command line.

    vlmtune demo [--output-dir DIR]
    vlmtune train CONFIG.yaml [--model NAME] [--variant NAME] [--set key.path=value ...]
    vlmtune grpo CONFIG.yaml [--model NAME] [--variant NAME] [--set key.path=value ...]   (GRPO; a grpo: section)
    vlmtune run CONFIG.yaml [--only NAME] [--dry-run]       (train + evaluate + summary + report.html)
    vlmtune run CONFIG.yaml --list                            (one run name per line: SLURM arrays, ...)
    vlmtune run CONFIG.yaml --launcher ray [--address ADDR]   (each run a Ray task: docs/distributed.md)
    vlmtune report OUTPUT_DIR
    vlmtune train --dataset data.jsonl --model-id ID [--mode llm|vision|both|projector]
    vlmtune inspect MODEL_ID [--model-type T]
    vlmtune preview CONFIG.yaml [--n N] [--json]
    vlmtune evaluate --run RUN_DIR --csv test.csv [--output-dir DIR]
    vlmtune evaluate --model-id ID [--lora-path P] [--model-type T] --csv test.csv
    vlmtune score predictions.jsonl [--metrics a,b,c] [--output F.json]
    vlmtune check CONFIG.yaml [--json] [--fast]
    vlmtune export RUN_DIR --to DIR [--dtype bfloat16] [--push-to-hub REPO] [--force]
    vlmtune chat RUN_DIR|MODEL --image PATH ["question"]   (no question: an interactive loop)

User errors print one line and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Any, Optional

from .errors import UserError
from .logs import setup_logging

log = logging.getLogger("vlmtune")


_setup_logging = setup_logging  # the name tests and older callers use


def load_cli_config(path: str, sets: Optional[list[str]] = None):
    """Load a config file with `--set key.path=value` overrides (list items by index, e.g.
    `models.0.hf_model_id`; see `config.apply_sets`) applied before validation."""
    from .config import load_config

    return load_config(path, sets=sets or None)


DEFAULT_MODEL_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
"""The quick form's model when neither --model-id nor VLMTUNE_MODEL_ID names one."""


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id.rstrip("/").split("/")[-1].replace("tiny:", "tiny_")) or "model"


def quick_config(args: argparse.Namespace):
    """The seed 002 quick form: `--dataset data.jsonl --model-id ID --mode llm`."""
    from .config import TRAINING_MODES, apply_sets, config_from_dict

    mode = args.mode or os.environ.get("TRAINING_MODE") or "llm"
    if mode not in TRAINING_MODES:
        raise UserError("TRAINING_MODE" if not args.mode else "--mode", f"unknown mode {mode!r}", f"use one of {', '.join(TRAINING_MODES)}")
    if not args.model_id:
        # seed 002's `TRAINING_MODE=llm ... train --dataset data.jsonl` names no model
        args.model_id = os.environ.get("VLMTUNE_MODEL_ID") or DEFAULT_MODEL_ID
        log.info("no --model-id: training %s (the default; --model-id or VLMTUNE_MODEL_ID picks another)", args.model_id)
    raw: dict[str, Any] = {
        "experiment_name": "quick",
        "output_dir": args.output_dir or "results/quick",
        "data": {"train_file": args.dataset},
        "models": [{"name": _slug(args.model_id), "hf_model_id": args.model_id, **({"model_type": args.model_type} if args.model_type else {})}],
        "training": {"training_mode": mode},
    }
    if args.set:
        raw = apply_sets(raw, args.set)  # the same paths as with a config file: models.0.min_pixels=3136
    return config_from_dict(raw, "command line")


def _resume_or_fresh(cfg, args: argparse.Namespace) -> None:
    """`train --resume-from CHECKPOINT` (one run continues from that checkpoint) and `train
    --fresh` (each selected run's old directory is moved aside, never deleted, and the run
    starts over); without either, a rerun resumes from each run's newest complete checkpoint."""
    resume_from, fresh = getattr(args, "resume_from", None), getattr(args, "fresh", False)
    if not (resume_from or fresh):
        return
    from .experiment.grid import select_runs
    from .train.rundir import RunDir, run_name

    if resume_from and fresh:
        raise UserError("train", "--resume-from and --fresh contradict each other", "keep one of them")
    runs = select_runs(cfg, args.model, args.variant)
    if resume_from:
        if cfg.training.stages:
            raise UserError("--resume-from", "not with training.stages (each stage resumes from its own checkpoints)", "drop --resume-from: a rerun resumes each stage")
        if len(runs) != 1:
            raise UserError("--resume-from", f"a checkpoint belongs to one run and the config selects {len(runs)}",
                            "pick the run with --model NAME --variant NAME")
        cfg.training.resume_from = resume_from
        return
    from . import dist

    for _, m, v in runs:
        moved = RunDir(cfg.resolved_output_dir() / run_name(m, v)).move_aside()  # rank 0 moves
        if moved:
            log.info("--fresh: %s moved aside to %s; the run starts over", run_name(m, v), moved)
    dist.init()
    dist.barrier()  # under a launcher no rank looks at a run folder before rank 0 has moved it


def cmd_train(args: argparse.Namespace) -> int:
    from .experiment.grid import run_grid

    if args.config and args.dataset:
        raise UserError("train", "give either CONFIG or --dataset, not both", "drop one of them")
    if args.config:
        cfg = load_cli_config(args.config, args.set)
        if args.output_dir:
            cfg.output_dir = args.output_dir
    elif args.dataset:
        cfg = quick_config(args)
    else:
        raise UserError("train", "nothing to train", "pass a CONFIG.yaml or --dataset data.jsonl --model-id ID")
    _resume_or_fresh(cfg, args)
    if getattr(args, "grpo", False) and cfg.grpo is None:
        raise UserError(args.config or "grpo", "the config has no grpo: section", "add one, e.g. grpo: {rewards: [{name: exact_match}]} (see docs/grpo.md)")
    results = run_grid(cfg, args.model, args.variant)
    from . import dist

    if not dist.is_main():
        return 0  # rank 0 reports for every rank
    for r in results:
        gm = r.get("generation_metrics") or {}
        em = gm.get("exact_match", {}).get("value")
        print(f"{r['run']}: final_train_loss={r['metrics']['final_train_loss']:.4f}" + (f" exact_match={em:.3f}" if em is not None else "") + f"  -> {r['run_dir']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Train and evaluate every model x variant, resumably; write ablation_summary.json and report.html."""
    from .experiment.grid import describe_runs, run_grid
    from .experiment.report import write_report
    from .experiment.summary import build_summary, log_summary
    from .io import atomic_write_json

    path = args.config or args.config_flag
    if not path:
        raise UserError("run", "no config given", "vlmtune run CONFIG.yaml (or --config CONFIG.yaml)")
    listing = args.dry_run or args.list
    if args.address and args.launcher != "ray":
        raise UserError("--address", "only the Ray launcher connects to a cluster", "add --launcher ray")
    if args.launcher == "ray" and not listing:
        from .experiment.ray_launcher import require_ray

        require_ray()  # not installed: one line naming the extra, before anything loads
    cfg = load_cli_config(path, args.set)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.list:  # one run name per line and nothing else on stdout (SLURM arrays: docs/distributed.md)
        from .experiment.grid import select_runs
        from .train.rundir import run_name

        print("\n".join(run_name(m, v) for _, m, v in select_runs(cfg, only=args.only)))
        return 0
    if args.dry_run:
        print("\n".join(describe_runs(cfg, args.only)))
        return 0
    if args.launcher == "ray":
        from .experiment.ray_launcher import run_grid_ray

        results = run_grid_ray(cfg, only=args.only, address=args.address, debug=args.debug)
    else:
        results = run_grid(cfg, only=args.only, keep_going=True, reuse=True)
    from . import dist

    if not dist.is_main():
        return 0  # rank 0 writes the summary and report for every rank
    if args.only:
        from .experiment.grid import whole_grid

        results = whole_grid(cfg, results)
    out = cfg.resolved_output_dir()
    summary = build_summary(cfg, results)
    atomic_write_json(out / "ablation_summary.json", summary)
    log_summary(cfg, summary)  # to training.report_to's loggers (docs/loggers.md)
    report = write_report(out)
    for r in summary["runs"]:
        if r["status"] == "complete":
            em = (r.get("metrics") or {}).get("exact_match", {}).get("value")
            print(f"{r['run']}: complete{' (reused)' if r.get('reused') else ''}, final_train_loss={_num(r.get('final_train_loss'))}"
                  + (f", exact_match={em:.3f}" if isinstance(em, (int, float)) else ""))
        elif r["status"] == "pending":
            print(f"{r['run']}: pending")
        else:
            print(f"{r['run']}: FAILED: {r.get('error')}")
    print(f"-> {out / 'ablation_summary.json'}, {report}")
    return 1 if summary["n_failed"] else 0


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def cmd_report(args: argparse.Namespace) -> int:
    from .experiment.report import write_report

    print(write_report(args.output_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import TRAINING_MODES, LoraConfig, ModelConfig, TrainingConfig, VisualEncoderSettings
    from .models.loading import load_model
    from .train.plan import describe_plan, estimate_trainable, format_report, parameter_report, plan_parts

    mcfg = ModelConfig(name="inspect", hf_model_id=args.model_id, model_type=args.model_type, trust_remote_code=args.trust_remote_code)
    lm = load_model(mcfg, where=args.model_id)
    lm.model.requires_grad_(False)
    report = parameter_report(lm.model, lm.parts)
    ve = VisualEncoderSettings()
    lora = LoraConfig(r=16, alpha=32, dropout=0.05)
    modes = {}
    for mode in TRAINING_MODES:
        plan = plan_parts(TrainingConfig(training_mode=mode), ve)
        try:
            est = estimate_trainable(lm.model, lm.parts, lm.family, plan, lora)
        except UserError as e:
            est = {"error": e.line()}
        modes[mode] = {"plan": describe_plan(plan), "trainable_parameters_lora_r16": est}
    found = {p: lm.parts.roots.get(p, []) for p in ("vision", "projector", "llm")}
    if args.json:
        print(json.dumps({"model": args.model_id, "family": lm.family_name, "class": type(lm.model).__name__, "parts": found,
                          "found_by": lm.parts.found_by, "unresolved": lm.parts.unresolved or None, "report": report, "modes": modes}, indent=2))
        return 0
    how = "parts from the family spec" if lm.parts.found_by == "family" else "no family: parts found by inspecting the model"
    print(f"{args.model_id}: {type(lm.model).__name__} (family {lm.family_name}; {how})")
    for p, paths in found.items():
        print(f"  {p:<10} {', '.join(paths) or '(not found)'}")
    if lm.parts.unresolved:
        print(f"  parts could not be told apart: {lm.parts.unresolved}; only training_mode: both (the whole model) can train")
    print(format_report(report))
    print("What each training_mode trains (LoRA r=16 on the family's default targets):")
    for mode, info in modes.items():
        est = info["trainable_parameters_lora_r16"]
        total = f"{sum(est.values()):,} trainable" if "error" not in est else est["error"]
        print(f"  {mode:<10} {info['plan']}  -> {total}")
    return 0


def preview_samples(cfg: Any, split: str = "train", n: int = 3, model: Optional[str] = None) -> list[tuple[dict[str, Any], Any]]:
    """What `vlmtune preview` shows for the first `n` samples of `split`: per sample, the
    printed row (text with image tokens, supervised tokens) and the `Encoded` model inputs
    (input_ids, labels, image tensors) it was made from."""
    from .data.collate import Encoder
    from .data.sources import load_split
    from .models.loading import load_processor_only

    idx = next((i for i, m in enumerate(cfg.models) if model in (None, m.name)), None)
    if idx is None:
        raise UserError("--model", f"no model named {model!r}", f"choose one of {', '.join(m.name for m in cfg.models)}")
    processor, family = load_processor_only(cfg.models[idx], f"models[{idx}]")
    enc = Encoder(processor, family)
    out = []
    for s in (load_split(cfg, split) or [])[:n]:
        e = enc.encode(s)
        out.append(({
            "id": s.id,
            "text": enc.decode_for_display(e.features["input_ids"]),
            "n_tokens": e.n_tokens,
            "n_image_tokens": e.n_image_tokens,
            "n_supervised_tokens": e.n_supervised,
            "supervised_text": enc.supervised_text(e),
            "supervised_segments": enc.supervised_segments(e),
        }, e))
    return out


def cmd_preview(args: argparse.Namespace) -> int:
    cfg = load_cli_config(args.config, args.set)
    for row, _ in preview_samples(cfg, args.split, args.n, args.model):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"=== {row['id']}  tokens={row['n_tokens']} image_tokens={row['n_image_tokens']} supervised={row['n_supervised_tokens']}")
            print(row["text"])
            print(f"--- supervised: {row['supervised_text']!r}")
    return 0


def _metric_list(raw: Optional[str]) -> Optional[list[str]]:
    if not raw:
        return None
    from .eval.metrics import check_names

    return check_names([m.strip() for m in raw.split(",") if m.strip()], "--metrics")


def _check_evaluate_flags(args: argparse.Namespace) -> None:
    """`vlmtune evaluate`'s numeric flags stand for config keys: the same ranges apply (from
    the config fields, not a copy here), before any data or model loads."""
    from .config import EvaluationConfig, ModelConfig, TrainingConfig, check_setting

    for flag, cls, key in (("--batch-size", EvaluationConfig, "batch_size"), ("--limit", EvaluationConfig, "max_samples"),
                           ("--max-new-tokens", TrainingConfig, "generation_max_new_tokens"), ("--num-beams", TrainingConfig, "generation_num_beams"),
                           ("--temperature", TrainingConfig, "generation_temperature"), ("--top-p", TrainingConfig, "generation_top_p"),
                           ("--min-pixels", ModelConfig, "min_pixels"), ("--max-pixels", ModelConfig, "max_pixels")):
        check_setting(cls, key, getattr(args, flag[2:].replace("-", "_"), None), flag)  # `chat` has only some of them


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval import standalone as S
    from .eval.generate import evaluate_samples

    if bool(args.run) == bool(args.model_id):
        raise UserError("evaluate", "give exactly one of --run RUN_DIR or --model-id ID", "e.g. vlmtune evaluate --run results/exp/model__lora_r16 --csv test.csv")
    if sum(bool(x) for x in (args.csv, args.jsonl, args.file)) != 1:
        raise UserError("evaluate", "give exactly one of --csv or --jsonl (or --file: any format)", "e.g. --csv data/test.csv (columns url, query, annotation)")
    if args.run and args.lora_path:
        raise UserError("--lora-path", "a run already names its adapter", "drop --lora-path (or use --model-id with --lora-path)")
    _check_evaluate_flags(args)
    metrics = _metric_list(args.metrics)
    S.prompt_style(None, args.prompt_template, None)  # a bad --prompt-template: one line before any data or model loads
    data_file = args.csv or args.jsonl or args.file
    dcfg = S.eval_data_config(args.image_column, args.query_column, args.annotation_column, args.image_root,
                              args.allow_absolute_paths, args.allow_remote_images)
    samples = S.load_eval_samples(data_file, dcfg,
                                  "--csv" if args.csv else "--jsonl" if args.jsonl else "--file", "csv" if args.csv else "json-auto" if args.jsonl else None)
    if args.limit:
        samples = samples[: args.limit]
    if args.run:
        run_dir = S.find_run_dir(args.run)
        em = S.load_run(run_dir, args.weights)
        from .train.rundir import RunDir

        out = Path(args.output_dir) if args.output_dir else RunDir(run_dir).eval_dir(Path(data_file).stem)
    else:
        em = S.load_model_id(args.model_id, args.lora_path, args.model_type, args.dtype, args.trust_remote_code, args.min_pixels, args.max_pixels)
        out = Path(args.output_dir) if args.output_dir else Path("results") / "evaluate" / _slug(args.model_id) / Path(data_file).stem
    rc = em.run_config
    settings = S.settings_from(rc, {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.do_sample or None,
                                    "temperature": args.temperature, "top_p": args.top_p})
    batch_size = args.batch_size or (rc and (rc.evaluation.batch_size or rc.training.per_device_eval_batch_size)) or 8
    metrics = metrics or (rc.evaluation.metrics if rc else None)
    style = S.prompt_style(rc, args.prompt_template, args.system_message)  # a run's data.system_message, as its own evaluation had
    result = evaluate_samples(em.model, em.encoder, samples, out, batch_size, settings, metrics, style, em.desc)
    print(f"{result['n_samples']} samples -> {out}/predictions.jsonl, {out}/generation_metrics.json")
    print(S.format_scores(result))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and every data file; count tokens with the processor only."""
    from .data.check import Problem, Report, count_tokens, format_report, load_checked_splits

    try:
        cfg = load_cli_config(args.config, args.set)
        if cfg.evaluation.metrics:  # the registry lives in eval/, downstream of config
            from .eval.metrics import check_names

            check_names(cfg.evaluation.metrics, "evaluation.metrics")
        from .train.loggers import check_installed

        check_installed(cfg.training.report_to)  # a logger that is not installed: one line naming the extra
        for v in cfg.variants():
            if "report_to" in (v.training or {}):
                check_installed(v.training["report_to"], f"lora_variants.{v.name}.training.report_to")
    except UserError as e:
        report = Report(problems=[Problem.of(e)])
    else:
        splits, report = load_checked_splits(cfg, full_decode=not args.fast)
        if not report.errors and not args.no_tokens:
            for i, m in enumerate(cfg.models):
                if args.model in (None, m.name):
                    report.lengths[m.name] = count_tokens(cfg, splits, i, report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 1 if report.errors else 0


def cmd_score(args: argparse.Namespace) -> int:
    from .eval import standalone as S

    result = S.score_file(args.predictions, _metric_list(args.metrics), args.output, args.tokenizer)
    print(f"{result['n_samples']} samples from {args.predictions}" + (f" -> {args.output}" if args.output else ""))
    print(S.format_scores(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .experiment.export import export_run

    r = export_run(args.run_dir, args.to, args.dtype, args.force, args.push_to_hub, args.private, args.weights)
    print(f"{r.run.name}: {r.source} -> {r.path} ({r.dtype}, {r.n_parameters:,} parameters, {r.size_bytes / 2**20:.1f} MiB; model card README.md)")
    if r.url:
        print(f"pushed -> {r.url}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .eval import chat as C
    from .eval import standalone as S

    _check_evaluate_flags(args)
    images = C.check_images(args.image)
    em = C.load_target(args.model, args.weights, args.model_type, args.lora_path, args.dtype, args.trust_remote_code, args.min_pixels, args.max_pixels)
    rc = em.run_config
    settings = S.settings_from(rc, {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.do_sample or None,
                                    "temperature": args.temperature, "top_p": args.top_p})
    style = S.prompt_style(rc, args.prompt_template, args.system_message)  # a run's data.system_message, as its own evaluation had
    chat = C.Chat(em, images, settings, style)
    if args.question:
        print(chat.ask(" ".join(args.question)))
        return 0
    C.interactive(chat, sys.stdin, sys.stdout, f"chat with {args.model} about {', '.join(args.image)}; `exit` or Ctrl-D ends")
    return 0


def _generation_flags(group: Any, system_help: str) -> None:
    """The generation flags `evaluate` and `chat` share (they override the run's settings)."""
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--num-beams", type=int)
    group.add_argument("--do-sample", action="store_true")
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--prompt-template", help='plain prompt instead of the chat template, e.g. "Question: {query}\\nAnswer:"')
    group.add_argument("--system-message", help=system_help)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    p = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune and evaluate vision-language models from one YAML file.")
    try:
        ver = version("vlmtune")
    except PackageNotFoundError:  # a source checkout that was never installed
        ver = "unknown (not installed)"
    p.add_argument("--version", action="version", version=f"vlmtune {ver}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    # `--debug` after the subcommand too (`vlmtune train c.yaml --debug`): SUPPRESS keeps a
    # subcommand that was not given it from resetting the top-level flag
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and library logs")
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, parents=[common, *kw.pop("parents", [])], **kw)  # type: ignore[method-assign]

    d = sub.add_parser("demo", help="train a tiny VLM on synthetic data and show it learned")
    d.add_argument("--output-dir", default="results/demo")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train every model x LoRA variant of a config (or the --dataset quick form)")
    t.add_argument("config", nargs="?", help="config YAML")
    t.add_argument("--model", help="only this model (by name)")
    t.add_argument("--variant", help="only this LoRA variant (by name)")
    t.add_argument("--dataset", help="quick form: a training data file in any format (JSONL, JSON, Parquet, ...: docs/data-formats.md)")
    t.add_argument("--model-id", help="quick form: hub id, local dir or tiny:<family> (default: $VLMTUNE_MODEL_ID, else Qwen/Qwen2.5-VL-3B-Instruct)")
    t.add_argument("--model-type", help="quick form: family (derived from the model when omitted)")
    t.add_argument("--mode", help="quick form: projector | llm | vision | both (default: $TRAINING_MODE or llm)")
    t.add_argument("--output-dir", help="override output_dir")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. training.max_steps=10")
    t.add_argument("--resume-from", metavar="CHECKPOINT", help="continue one run from this checkpoint folder (default: each run's newest complete checkpoint)")
    t.add_argument("--fresh", action="store_true", help="start over: move each selected run's old directory aside (<run>.old-<time>) first")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("grpo", help="reinforcement learning (GRPO) on every model x LoRA variant of a config with a grpo: section")
    g.add_argument("config", help="config YAML with a grpo: section")
    g.add_argument("--model", help="only this model (by name)")
    g.add_argument("--variant", help="only this LoRA variant (by name)")
    g.add_argument("--output-dir", help="override output_dir")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. grpo.beta=0")
    g.set_defaults(func=cmd_train, grpo=True, dataset=None)

    r = sub.add_parser("run", help="train + evaluate every model x LoRA variant, resumably; summary and report.html")
    r.add_argument("config", nargs="?", help="config YAML")
    r.add_argument("--config", dest="config_flag", help="same as the positional CONFIG (seed habit: vlm_finetune_and_eval.py --config ...)")
    r.add_argument("--only", help="only this run (<model>__<variant>), variant or model")
    r.add_argument("--dry-run", action="store_true", help="list the runs and what each trains, then stop")
    r.add_argument("--list", action="store_true", help="print the run names, one per line (with --only: the runs it selects), then stop")
    r.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local: the runs one after another in this process; ray: each run a Ray task with resources_per_run (pip install 'vlmtune[ray]')")
    r.add_argument("--address", help="--launcher ray: the Ray cluster to join (e.g. auto, HOST:6379); default a local instance")
    r.add_argument("--output-dir", help="override output_dir")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="(re)write OUTPUT_DIR/report.html from its ablation_summary.json")
    rp.add_argument("output_dir")
    rp.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", help="parameters by part and what each mode trains")
    i.add_argument("model_id")
    i.add_argument("--model-type")
    i.add_argument("--trust-remote-code", action="store_true")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("preview", help="the first samples exactly as the model sees them")
    v.add_argument("config")
    v.add_argument("--n", type=int, default=3)
    v.add_argument("--json", action="store_true", help="one JSON object per line")
    v.add_argument("--model", help="which model's processor (default: the first)")
    v.add_argument("--split", default="train", choices=["train", "val", "test"])
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=cmd_preview)

    e = sub.add_parser("evaluate", help="generate on a test set and score it (a finished run, or any model)")
    src = e.add_argument_group("what to evaluate (one of)")
    src.add_argument("--run", help="a run directory written by `vlmtune train` (or its name under results/*/)")
    src.add_argument("--model-id", help="hub id, local directory or tiny:<family>")
    src.add_argument("--lora-path", help="with --model-id: a LoRA adapter folder to merge in")
    src.add_argument("--model-type", help="with --model-id: family (derived from the model when omitted)")
    src.add_argument("--weights", choices=["auto", "final", "adapter"], default="auto", help="with --run: final/ (merged) or lora_adapter/ on the base (default: final/ when present)")
    src.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="with --model-id: weight dtype")
    src.add_argument("--trust-remote-code", action="store_true")
    src.add_argument("--min-pixels", type=int, help="with --model-id: Qwen-VL resolution bounds")
    src.add_argument("--max-pixels", type=int)
    data = e.add_argument_group("data")
    data.add_argument("--csv", help="evaluation CSV (columns url, query, annotation; annotation may be a JSON list of answers)")
    data.add_argument("--jsonl", help="evaluation JSONL or JSON array (messages/conversations records; optional references list)")
    data.add_argument("--file", help="evaluation data in any format: CSV, JSON(L), Parquet, Arrow, a save_to_disk folder (docs/data-formats.md)")
    data.add_argument("--image-column", default="url")
    data.add_argument("--query-column", help="default: query (or instruction)")
    data.add_argument("--annotation-column", help="default: annotation (or response)")
    data.add_argument("--image-root", help="folder relative image paths resolve against")
    data.add_argument("--allow-absolute-paths", action="store_true", help="allow image paths outside the image root / data folder / working directory")
    data.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// images (size-capped, with a timeout)")
    data.add_argument("--limit", type=int, help="only the first N samples")
    gen = e.add_argument_group("generation")
    gen.add_argument("--batch-size", type=int, help="default: the run's evaluation batch size, else 8")
    _generation_flags(gen, "system message before each conversation")
    e.add_argument("--metrics", help="comma-separated metric names (default: exact_match,bleu4,meteor,rouge_l,cider,token_stats)")
    e.add_argument("--output-dir", help="default: RUN_DIR/eval/<data file> or results/evaluate/<model>/<data file>")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("check", help="validate a config and every data file before anything trains")
    c.add_argument("config")
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.add_argument("--fast", action="store_true", help="read image headers only (no full decode)")
    c.add_argument("--no-tokens", action="store_true", help="skip token counting (no processor load)")
    c.add_argument("--model", help="count tokens for this model only (default: every model)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=cmd_check)

    sc = sub.add_parser("score", help="recompute metrics from a predictions.jsonl (no model needed)")
    sc.add_argument("predictions")
    sc.add_argument("--metrics", help="comma-separated metric names")
    sc.add_argument("--output", help="write the metrics JSON here")
    sc.add_argument("--tokenizer", help="model id or folder whose tokenizer counts tokens for token_stats")
    sc.set_defaults(func=cmd_score)

    x = sub.add_parser("export", help="a run's merged model + processor + model card in one folder (transformers, vLLM, the hub)")
    x.add_argument("run_dir", help="a run directory written by `vlmtune train` (or its name under results/*/)")
    x.add_argument("--to", required=True, help="the folder to write (built beside it, then renamed into place)")
    x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the weights (default: as the run saved them)")
    x.add_argument("--weights", choices=["auto", "final", "adapter"], default="auto", help="final/ (merged) or lora_adapter/ merged onto the base (default: final/ when present)")
    x.add_argument("--force", action="store_true", help="replace an earlier export in --to")
    x.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository (user/name); needs a token (hf auth login or HF_TOKEN)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    x.set_defaults(func=cmd_export)

    ch = sub.add_parser("chat", help="ask a run's model (or any model) about an image: one answer, or an interactive loop")
    ch.add_argument("model", help="a run directory (or its name under results/*/), an exported folder, a hub id or tiny:<family>")
    ch.add_argument("question", nargs="*", help="the question (none: read questions from the terminal, one per line)")
    ch.add_argument("--image", action="append", required=True, help="an image file or URL (repeat for several)")
    ch.add_argument("--weights", choices=["auto", "final", "adapter"], default="auto", help="with a run: final/ or lora_adapter/ on the base")
    ch.add_argument("--lora-path", help="with a model: a LoRA adapter folder to merge in")
    ch.add_argument("--model-type", help="with a model: family (derived from the model when omitted)")
    ch.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="with a model: weight dtype")
    ch.add_argument("--trust-remote-code", action="store_true")
    ch.add_argument("--min-pixels", type=int, help="with a model: Qwen-VL resolution bounds (a run uses its own)")
    ch.add_argument("--max-pixels", type=int)
    cg = ch.add_argument_group("generation (default: the run's own settings, as its evaluation)")
    _generation_flags(cg, "system message before the conversation (default: the run's data.system_message)")
    ch.set_defaults(func=cmd_chat)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) == "chat" and not any(a.startswith("-") for a in extra):
            args.question = [*args.question, *extra]  # `chat RUN --image X "question"`: argparse takes no positional after an option
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.debug)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        code = getattr(e, "exit_code", 1)  # 128 + signal for a run stopped by SIGTERM / Ctrl-C
        print(f"{'stopped' if code != 1 else 'error'}: {e.line()}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`vlmtune evaluate` and `vlmtune score` through the real entry point on a tiny trained run:
reproducing the run's own evaluation, the seed's evaluation CSV (url, query, annotation with
several answers), resuming after SIGKILL without regenerating, prompt templates, and scoring
a predictions file without a model."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_config
from vlmtune.cli import main

FAST = ["exact_match", "rouge_l", "token_stats"]


@pytest.fixture(scope="module")
def run_dir(shapes_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = write_config(tmp / "c.yaml", shapes_dir, tmp / "out", evaluation={"enabled": True, "batch_size": 4, "metrics": FAST})
    assert main(["train", str(cfg)]) == 0
    return tmp / "out" / "q__r8"


@pytest.fixture(scope="module")
def seed_csv(shapes_dir, tmp_path_factory) -> Path:
    """Seed 003's evaluation CSV: url, query, annotation (here a JSON list of two answers),
    48 rows so an evaluation at batch size 1 takes long enough to be killed midway."""
    rows = list(csv.DictReader(open(shapes_dir / "test.csv")))
    out = tmp_path_factory.mktemp("evalcsv") / "eval.csv"
    (out.parent / "shapes").symlink_to(shapes_dir)  # images under their own root (--image-root)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "query", "annotation"])
        for k in range(48):
            r = rows[k % len(rows)]
            w.writerow([r["url"], r["query"], json.dumps([r["annotation"], r["annotation"].upper()])])
    return out


def _lines(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines()]


def test_evaluate_run_reproduces_the_runs_own_evaluation(run_dir, shapes_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run_dir), "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out), "--metrics", ",".join(FAST)]) == 0
    ours, theirs = _lines(out / "predictions.jsonl"), _lines(run_dir / "predictions.jsonl")
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs]
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    a, b = json.loads((out / "generation_metrics.json").read_text()), json.loads((run_dir / "generation_metrics.json").read_text())
    assert a["exact_match"]["value"] == b["exact_match"]["value"] and a["rouge_l"]["value"] == b["rouge_l"]["value"]
    assert a["generation"]["max_new_tokens"] == 4  # the run's own generation settings
    assert "exact_match" in capsys.readouterr().out
    # the adapter on its base model gives the same predictions as final/
    out2 = tmp_path / "ev2"
    assert main(["evaluate", "--run", str(run_dir), "--weights", "adapter", "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out2), "--metrics", "exact_match"]) == 0
    assert [r["prediction"] for r in _lines(out2 / "predictions.jsonl")] == [r["prediction"] for r in ours]


SYSTEM = "You are a careful assistant who names colors and shapes."


def test_evaluate_run_keeps_the_runs_system_message(shapes_dir, tmp_path):
    """A run trained with data.system_message: `evaluate --run` puts it before every
    conversation, as the run's own evaluation did (same prompt tokens, same predictions);
    --system-message still overrides it."""
    from vlmtune.eval.generate import build_prompt
    from vlmtune.eval.standalone import eval_data_config, load_eval_samples, load_run, prompt_style

    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", data={"system_message": SYSTEM}, training={"max_steps": 2},
                       evaluation={"enabled": True, "batch_size": 4, "metrics": ["exact_match"]})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "out" / "q__r8"
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run), "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out), "--metrics", "exact_match"]) == 0
    keys = ("id", "prediction", "n_prompt_tokens")
    ours, theirs = _lines(out / "predictions.jsonl"), _lines(run / "predictions.jsonl")
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]  # the system turn's tokens included
    assert json.loads((out / "generation_metrics.json").read_text())["prompt"]["system_message"] == SYSTEM

    em = load_run(run, device="cpu")
    sample = load_eval_samples(str(shapes_dir / "test.csv"), eval_data_config("url", None, None, None), "--csv", "csv")[0]
    assert SYSTEM in build_prompt(em.encoder, sample, prompt_style(em.run_config, None, None))
    other = build_prompt(em.encoder, sample, prompt_style(em.run_config, None, "Be brief."))
    assert "Be brief." in other and SYSTEM not in other


def test_model_id_with_lora_path_and_seed_csv(run_dir, seed_csv, tmp_path):
    base = json.loads((run_dir / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = tmp_path / "ev"
    argv = ["evaluate", "--model-id", base, "--lora-path", str(run_dir / "lora_adapter"), "--csv", str(seed_csv), "--limit", "8",
            "--image-root", str(seed_csv.parent / "shapes"),
            "--min-pixels", "3136", "--max-pixels", "3136", "--max-new-tokens", "4", "--batch-size", "8", "--output-dir", str(out), "--metrics", "exact_match"]
    assert main(argv) == 0
    recs = _lines(out / "predictions.jsonl")
    assert len(recs) == 8 and all(len(r["references"]) == 2 and r["references"][1] == r["references"][0].upper() for r in recs)
    assert set(recs[0]) >= {"id", "image", "query", "prediction", "references", "n_prompt_tokens", "n_generated_tokens"}
    # same predictions as the run's own final/ on the same questions (first 8 rows = test.csv)
    theirs = _lines(run_dir / "predictions.jsonl")
    assert [r["prediction"] for r in recs] == [r["prediction"] for r in theirs]


def _evaluate_cmd(run_dir: Path, csv_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vlmtune.cli", "evaluate", "--run", str(run_dir), "--csv", str(csv_path), "--batch-size", "1",
            "--image-root", str(csv_path.parent / "shapes"),
            "--output-dir", str(out), "--metrics", "exact_match"]


def test_killed_evaluation_resumes_without_regenerating(run_dir, seed_csv, tmp_path):
    out = tmp_path / "ev"
    preds = out / "predictions.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_evaluate_cmd(run_dir, seed_csv, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if preds.exists() and preds.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = preds.read_bytes()
    done = before.count(b"\n")
    assert 5 <= done < 48 and not (out / "generation_metrics.json").exists()

    second = subprocess.run(_evaluate_cmd(run_dir, seed_csv, out), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{done} of 48 samples already generated" in second.stderr
    after = preds.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 48  # finished lines kept byte for byte
    gm = json.loads((out / "generation_metrics.json").read_text())
    assert gm["generated_this_session"] == 48 - done and gm["n_samples"] == 48
    assert [r["id"] for r in _lines(preds)] == [f"eval.csv:{k + 2}" for k in range(48)]


def test_changed_settings_move_old_predictions_aside(run_dir, shapes_dir, tmp_path):
    out = tmp_path / "ev"
    base = ["evaluate", "--run", str(run_dir), "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out), "--metrics", "exact_match"]
    assert main(base + ["--max-new-tokens", "2"]) == 0
    first = (out / "predictions.jsonl").read_text()
    assert main(base + ["--max-new-tokens", "4"]) == 0
    aside = [p for p in out.glob("predictions.*.jsonl")]
    assert len(aside) == 1 and aside[0].read_text() == first  # nothing lost
    gm = json.loads((out / "generation_metrics.json").read_text())
    assert gm["generated_this_session"] == 8 and gm["generation"]["max_new_tokens"] == 4


def test_prompt_template_puts_image_markup_and_query(run_dir, shapes_dir, tmp_path):
    from vlmtune.data.sources import Sample
    from vlmtune.eval.generate import PromptStyle, build_prompt
    from vlmtune.eval.standalone import load_run

    em = load_run(run_dir)
    s = Sample(id="x", messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], images=["a.png"])
    text = build_prompt(em.encoder, s, PromptStyle("Question: {query}\nAnswer:", "Be brief."))
    assert text == "Be brief.\n<|vision_start|><|image_pad|><|vision_end|>Question: What color?\nAnswer:"
    chat = build_prompt(em.encoder, s, PromptStyle(system_message="Be brief."))
    assert "Be brief." in chat and "<|im_start|>assistant" in chat and "red" not in chat
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run_dir), "--csv", str(shapes_dir / "test.csv"), "--output-dir", str(out), "--metrics", "exact_match",
                 "--prompt-template", "Question: {query}\\nAnswer:"]) == 0
    gm = json.loads((out / "generation_metrics.json").read_text())
    assert gm["prompt"]["template"] == "Question: {query}\nAnswer:"
    # the processor expanded the one image placeholder into the image's tokens
    assert all(r["n_prompt_tokens"] > 8 for r in _lines(out / "predictions.jsonl"))


def test_score_recomputes_metrics_without_a_model(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["score", str(run_dir / "predictions.jsonl"), "--metrics", "exact_match,rouge_l", "--output", str(out)]) == 0
    got, want = json.loads(out.read_text()), json.loads((run_dir / "generation_metrics.json").read_text())
    for k in ("exact_match", "rouge_l"):
        assert got[k]["value"] == want[k]["value"] and got[k]["ci95"] == want[k]["ci95"]
    assert "rouge_l" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ('{"prediction": "a"}', "references: must be a non-empty list of strings"),
    ('{"prediction": 3, "references": ["a"]}', "prediction: missing or not a string"),
    ('{"prediction": "a", "references": []}', "references: must be a non-empty list"),
    ("not json", "not valid JSON"),
    ('["a"]', "a line must be a JSON object"),
])
def test_score_rejects_bad_lines_with_file_and_line(tmp_path, capsys, line, message):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prediction": "a", "references": ["a"]}\n' + line + "\n")
    assert main(["score", str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {p}:2") and message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--csv", "x.csv"], "exactly one of --run"),
    (["evaluate", "--run", "nowhere", "--csv", "x.csv"], "not found"),
    (["evaluate", "--model-id", "tiny:qwen2_5_vl"], "exactly one of --csv or --jsonl"),
    (["evaluate", "--model-id", "tiny:qwen2_5_vl", "--csv", "x.csv", "--metrics", "bleu"], "did you mean 'bleu4'"),
    (["evaluate", "--model-id", "tiny:qwen2_5_vl", "--csv", "x.csv", "--prompt-template", "Q:"], "no {query} placeholder"),
    (["score", "missing.jsonl"], "file not found"),
])
def test_evaluate_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

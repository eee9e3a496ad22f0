"""`vlmtune run`: a models x variants grid end to end, resumable after SIGKILL, failures
recorded without stopping the grid, ablation_summary.json and a self-contained report.html."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_config
from vlmtune.cli import main

FAST = ["exact_match", "rouge_l", "bleu4"]
VARIANTS = [
    {"name": "r4", "r": 4, "alpha": 8, "dropout": 0.0},
    # a variant that changes what trains, not only the LoRA shape
    {"name": "both_r8", "r": 8, "alpha": 16, "dropout": 0.0, "training": {"training_mode": "both", "learning_rate": "2e-3"}},
]
MODELS = [
    {"name": "q", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 3136},
    {"name": "l", "hf_model_id": "tiny:llava"},
]


def _grid_config(tmp: Path, shapes_dir: Path, **over) -> Path:
    return write_config(tmp / "grid.yaml", shapes_dir, tmp / "out", models=MODELS, lora_variants=VARIANTS,
                        training={"max_steps": 4, "save_steps": 2, "logging_steps": 1},
                        evaluation={"enabled": True, "batch_size": 8, "metrics": FAST}, **over)


@pytest.fixture(scope="module")
def grid(shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    cfg = _grid_config(tmp, shapes_dir)
    assert main(["run", str(cfg)]) == 0
    return cfg, tmp / "out"


def test_grid_writes_the_tree_summary_and_report(grid):
    cfg, out = grid
    names = ["q__r4", "q__both_r8", "l__r4", "l__both_r8"]
    for n in names:
        for rel in ("lora_adapter/adapter_model.safetensors", "final/config.json", "metrics.json", "config.yaml",
                    "parameter_report.json", "predictions.jsonl", "generation_metrics.json"):
            assert (out / n / rel).exists(), f"{n}/{rel}"
    s = json.loads((out / "ablation_summary.json").read_text())
    assert [r["run"] for r in s["runs"]] == names and s["n_failed"] == 0
    for r in s["runs"]:
        assert r["status"] == "complete" and r["model"]["hf_model_id"].startswith("tiny:")
        assert r["parameters"]["total"] > r["parameters"]["trainable"] > 0 and set(r["parameters"]["by_part"]) >= {"vision", "projector", "llm"}
        assert r["train_seconds"] > 0 and r["tokens_seen"] > 0 and r["tokens_per_second"] > 0 and r["peak_memory"]["bytes"] > 0
        assert r["final_train_loss"] > 0 and r["global_step"] == 4
        for m in FAST:
            assert set(r["metrics"][m]) == {"value", "ci95"}
    by = {r["run"]: r for r in s["runs"]}
    # the variant's training override took effect: mode both trains the vision LoRA
    assert by["q__both_r8"]["settings"]["training"]["training_mode"] == "both" and by["q__r4"]["settings"]["training"]["training_mode"] == "llm"
    assert by["q__both_r8"]["parameters"]["by_part"]["vision"]["trainable"] > 0 == by["q__r4"]["parameters"]["by_part"]["vision"]["trainable"]
    assert by["q__both_r8"]["settings"]["training"]["learning_rate"] == 2e-3
    # baseline = first variant of each model; one paired test per other run and metric
    assert {(t["run"], t["baseline"]) for t in s["paired_tests"]} == {("q__both_r8", "q__r4"), ("l__both_r8", "l__r4")}
    assert all(t["n"] == 8 and t["ci95"][0] <= t["difference"] <= t["ci95"][1] and 0 <= t["p_value"] <= 1 for t in s["paired_tests"])
    assert set(s["best"]) == set(FAST)
    html = (out / "report.html").read_text()
    for n in names:
        assert f'data-run="{n}"' in html
    assert html.count("data:image/png;base64,") >= 1 + len(FAST)  # loss curves + one chart per metric
    assert "http://" not in html and "https://" not in html  # self-contained


def test_rerun_reuses_finished_runs_untouched(grid, capsys):
    cfg, out = grid
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "out"}
    assert main(["run", str(cfg)]) == 0
    assert capsys.readouterr().out.count("(reused)") == 4
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def test_dry_run_and_only(grid, capsys):
    cfg, out = grid
    assert main(["run", str(cfg), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("q__both_r8:") and "mode both" in lines[1] and "vision lora" in lines[1]
    assert "mode llm" in lines[0] and "vision frozen" in lines[0]
    assert main(["run", str(cfg), "--only", "l__r4"]) == 0
    s = json.loads((out / "ablation_summary.json").read_text())
    # the summary still covers the whole grid: the other runs are finished on disk
    assert [(r["run"], r["status"]) for r in s["runs"]] == [("q__r4", "complete"), ("q__both_r8", "complete"), ("l__r4", "complete"), ("l__both_r8", "complete")]
    assert len(s["paired_tests"]) == 2 * len(FAST)
    assert main(["run", str(cfg), "--only", "nope"]) == 1


def test_a_failing_run_is_recorded_and_the_grid_goes_on(shapes_dir, tmp_path, capsys):
    bad = [VARIANTS[0], {"name": "bad", "r": 4, "alpha": 8, "target_modules": ["no_such_proj"]}]
    cfg = write_config(tmp_path / "g.yaml", shapes_dir, tmp_path / "out", models=MODELS[:1], lora_variants=bad,
                       training={"max_steps": 2, "save_steps": 2}, evaluation={"enabled": True, "batch_size": 8, "metrics": ["exact_match"]})
    assert main(["run", str(cfg)]) == 1
    s = json.loads((tmp_path / "out" / "ablation_summary.json").read_text())
    assert [r["status"] for r in s["runs"]] == ["complete", "failed"]
    assert "matches no linear module" in s["runs"][1]["error"] and s["n_failed"] == 1
    assert "FAILED" in capsys.readouterr().out


def _finished_files(out: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file of every finished run (evaluated: generation_metrics.json), with its mtime."""
    files = {}
    for run in out.iterdir() if out.is_dir() else []:
        if (run / "generation_metrics.json").is_file():
            files.update({p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()})
    return files


def test_grid_killed_five_times_at_random_moments_ends_like_an_uninterrupted_grid(shapes_dir, tmp_path):
    """kill -9 at five seeded-random moments (during loading, training, checkpointing,
    writing outputs or evaluating, wherever they fall): finished runs are never touched again,
    and the grid completes with the losses, predictions and metrics of an uninterrupted one."""
    import random

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float reductions in every process

    def config(where: Path) -> Path:
        return write_config(where / "g.yaml", shapes_dir, where / "out", models=MODELS[:1], lora_variants=VARIANTS,
                            training={"max_steps": 6, "save_steps": 2, "logging_steps": 1},
                            evaluation={"enabled": True, "batch_size": 4, "metrics": ["exact_match"]})

    (tmp_path / "ref").mkdir()
    t0 = time.time()
    ref = subprocess.run([sys.executable, "-m", "vlmtune", "run", str(config(tmp_path / "ref"))], env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    whole = time.time() - t0  # an uninterrupted grid's wall time on this machine, as it is loaded now
    (tmp_path / "k").mkdir()
    cfg, out = config(tmp_path / "k"), tmp_path / "k" / "out"
    cmd = [sys.executable, "-m", "vlmtune", "run", str(cfg)]
    rng = random.Random(20261202)
    kills = 0
    # kill points spread over the first half of a whole grid: each rerun also pays start-up
    # again, so five of them land before the grid can finish
    for delay in [rng.uniform(2.0, max(3.0, 0.45 * whole)) for _ in range(5)]:
        done = _finished_files(out)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        for p, (data, mtime) in done.items():  # a finished run is never written again
            assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p
    assert kills >= 4, "the grid finished before most kills: lengthen the runs"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = (json.loads((o / "ablation_summary.json").read_text()) for o in (out, tmp_path / "ref" / "out"))
    assert [x["run"] for x in ours["runs"]] == [x["run"] for x in theirs["runs"]] == ["q__r4", "q__both_r8"]
    for a, b in zip(ours["runs"], theirs["runs"]):
        assert a["status"] == b["status"] == "complete" and a["global_step"] == b["global_step"] == 6
        assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-6, (a["run"], a["final_train_loss"], b["final_train_loss"])
        assert a["metrics"]["exact_match"]["value"] == b["metrics"]["exact_match"]["value"]
        preds = [json.loads(line)["prediction"] for line in (out / a["run"] / "predictions.jsonl").read_text().splitlines()]
        want = [json.loads(line)["prediction"] for line in (tmp_path / "ref" / "out" / a["run"] / "predictions.jsonl").read_text().splitlines()]
        assert preds == want
        assert not list((out / a["run"]).glob(".*")), list((out / a["run"]).glob(".*"))


def test_paired_bootstrap_detects_a_real_difference():
    from vlmtune.experiment.summary import paired_bootstrap

    refs = [{"id": str(i), "prediction": "", "references": ["yes" if i % 2 else "no"]} for i in range(200)]
    good = [{**r, "prediction": r["references"][0] if i % 10 else "maybe"} for i, r in enumerate(refs)]  # 90% right
    bad = [{**r, "prediction": r["references"][0] if i % 2 else "maybe"} for i, r in enumerate(refs)]  # 50% right
    t = paired_bootstrap("exact_match", good, bad)
    assert t["difference"] == pytest.approx(0.4) and t["ci95"][0] > 0.3 and t["p_value"] < 0.01 and t["n"] == 200
    same = paired_bootstrap("exact_match", good, good)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_and_sorts_in_a_real_browser(grid, tmp_path):
    from playwright.sync_api import sync_playwright

    _, out = grid
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").as_uri())
        rows = page.locator("#runs tbody tr")
        assert rows.count() == 4
        assert all(page.locator("img").nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(page.locator("img").count()))
        col = ["run", "status", "trainable params"].index("trainable params")
        page.locator("#runs th").nth(col).click()
        vals = [float(v) for v in page.locator(f"#runs tbody tr td:nth-child({col + 1})").evaluate_all("tds => tds.map(t => t.dataset.v)")]
        assert vals == sorted(vals)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000

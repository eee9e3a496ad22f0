"""`vlmtune run --launcher ray` on a local CPU Ray instance: the same run directories and
summary as the local launcher, resume, retry-once-then-report (report at once for a user
error), `--list` / `--only` for other
schedulers, and one line when Ray is not installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import write_config
from vlmtune.cli import main

ray = pytest.importorskip("ray")

MODEL = [{"name": "q", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 3136}]
R4 = {"name": "r4", "r": 4, "alpha": 8, "dropout": 0.0}
R8 = {"name": "r8", "r": 8, "alpha": 16, "dropout": 0.0}
BAD = {"name": "bad", "r": 4, "alpha": 8, "target_modules": ["no_such_proj"]}
RUN_FILES = ("lora_adapter/adapter_model.safetensors", "final/config.json", "metrics.json", "config.yaml",
             "parameter_report.json", "predictions.jsonl", "generation_metrics.json")


def _config(path: Path, shapes_dir: Path, out: Path, variants: list[dict]) -> Path:
    return write_config(path, shapes_dir, out, models=MODEL, lora_variants=variants,
                        training={"max_steps": 2, "save_steps": 2, "logging_steps": 1},
                        evaluation={"enabled": True, "batch_size": 2, "max_samples": 2, "metrics": ["exact_match"]},
                        resources_per_run={"gpus": 0, "cpus": 1})


@pytest.fixture(scope="module")
def local_ray():
    """One local CPU Ray instance for the module; its workers inherit this environment
    (VLMTUNE_HOME's tiny models, one thread each)."""
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_grid(local_ray, shapes_dir, tmp_path_factory):
    """The same grid, one run that trains and one that fails, through the local launcher and
    through Ray."""
    tmp = tmp_path_factory.mktemp("raygrid")
    local = _config(tmp / "local.yaml", shapes_dir, tmp / "local", [R4, BAD])
    viaray = _config(tmp / "ray.yaml", shapes_dir, tmp / "ray", [R4, BAD])
    assert main(["run", str(local)]) == 1
    assert main(["run", str(viaray), "--launcher", "ray"]) == 1
    return tmp, viaray


def _summary(out: Path) -> dict:
    return json.loads((out / "ablation_summary.json").read_text())


def test_ray_gives_the_run_dirs_and_summary_of_the_local_launcher(ray_grid):
    """...and `bad`, whose task fails with a user error (a LoRA target that matches nothing),
    is reported failed after one attempt while the other run completes."""
    tmp, _ = ray_grid
    ours, theirs = _summary(tmp / "ray"), _summary(tmp / "local")
    assert [(r["run"], r["status"]) for r in ours["runs"]] == [(r["run"], r["status"]) for r in theirs["runs"]] \
        == [("q__r4", "complete"), ("q__bad", "failed")]
    assert ours["n_failed"] == theirs["n_failed"] == 1 and (tmp / "ray" / "report.html").is_file()
    a, b = ours["runs"][0], theirs["runs"][0]
    assert a["run_dir"] == str(tmp / "ray" / "q__r4")
    for rel in RUN_FILES:
        assert (tmp / "ray" / "q__r4" / rel).is_file(), rel
    assert a["global_step"] == b["global_step"] == 2
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-4, (a["final_train_loss"], b["final_train_loss"])
    assert a["metrics"]["exact_match"]["value"] == b["metrics"]["exact_match"]["value"]
    preds = [(tmp / d / "q__r4" / "predictions.jsonl").read_text().splitlines() for d in ("ray", "local")]
    assert [json.loads(x)["prediction"] for x in preds[0]] == [json.loads(x)["prediction"] for x in preds[1]]
    fa, fb = ours["runs"][1], theirs["runs"][1]
    assert fa["error"] == fb["error"] and "matches no linear module" in fa["error"] and fa["attempts"] == 1
    assert {p.name for p in (tmp / "ray").iterdir()} == {p.name for p in (tmp / "local").iterdir()}


def test_rerun_through_ray_reuses_finished_runs_untouched(ray_grid, capsys):
    tmp, cfg = ray_grid
    out = tmp / "ray"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    capsys.readouterr()
    assert main(["run", str(cfg), "--launcher", "ray", "--only", "q__r4"]) == 0  # the summary covers the grid: bad pending
    printed = capsys.readouterr().out
    assert "q__r4: complete (reused)" in printed and "q__bad: pending" in printed
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_task_failing_once_succeeds_on_the_retry(ray_grid, shapes_dir):
    from vlmtune.config import load_config
    from vlmtune.experiment.ray_launcher import run_grid_ray

    tmp, _ = ray_grid
    cfg = _config(tmp / "retry.yaml", shapes_dir, tmp / "ray", [R4, {**R8, "name": "r2", "r": 2, "alpha": 4}])
    marks = tmp / "attempts"
    marks.mkdir()

    def fails_once(cfg_dict, config_dir, name, splits, bad, debug=False):
        from pathlib import Path

        from vlmtune.experiment.ray_launcher import run_task

        mark = Path(str(marks)) / name
        if not mark.exists():
            mark.write_text("1")
            raise RuntimeError(f"{name}: first attempt fails")
        mark.write_text("2")
        return run_task(cfg_dict, config_dir, name, splits, bad, debug)

    res = run_grid_ray(load_config(cfg), task=fails_once)
    assert [(r["run"], r["status"]) for r in res] == [("q__r4", "complete"), ("q__r2", "complete")]
    assert res[0]["reused"] is True and not (marks / "q__r4").exists()  # finished: never sent to Ray
    assert (marks / "q__r2").read_text() == "2" and res[1]["metrics"]["global_step"] == 2 and "attempts" not in res[1]
    assert (tmp / "ray" / "q__r2" / "generation_metrics.json").is_file()


def test_a_user_error_is_reported_at_once_other_failures_retry_once(local_ray, shapes_dir, tmp_path, caplog):
    """A UserError fails the same way every time: no second attempt (and no second model load),
    the error logged once. Any other failure is still retried once. Cheap: neither task loads a
    model (the user error is an unknown config key, found by the worker's config check)."""
    import logging

    from vlmtune.config import load_config
    from vlmtune.experiment.ray_launcher import run_grid_ray

    cfg = _config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", [R4, R8])
    marks = tmp_path / "attempts"
    marks.mkdir()

    def counted(cfg_dict, config_dir, name, splits, bad, debug=False):
        from pathlib import Path

        mark = Path(str(marks)) / name
        mark.write_text(mark.read_text() + "x" if mark.exists() else "x")
        if name == "q__r8":
            raise RuntimeError(f"{name}: crashed")
        from vlmtune.experiment.ray_launcher import run_task

        # run_task's own handling of a UserError (the worker's config check refuses the key)
        return run_task({**cfg_dict, "training": {**cfg_dict["training"], "no_such_key": 1}}, config_dir, name, splits, bad, debug)

    with caplog.at_level(logging.INFO, logger="vlmtune"):
        res = run_grid_ray(load_config(cfg), task=counted)
    user, other = res
    assert (user["run"], user["status"], user["attempts"]) == ("q__r4", "failed", 1) and "no_such_key" in user["error"]
    assert (other["run"], other["status"], other["attempts"]) == ("q__r8", "failed", 2) and "crashed" in other["error"]
    assert (marks / "q__r4").read_text() == "x" and (marks / "q__r8").read_text() == "xx"
    assert not {"retry", "traceback"} & (set(user) | set(other))  # the driver's, not the summary's
    said = [r.getMessage() for r in caplog.records if "no_such_key" in r.getMessage()]
    assert len(said) == 1 and "retrying" not in said[0], said


def test_list_prints_exactly_the_run_names(shapes_dir, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", [R4, R8])
    assert main(["run", str(cfg), "--list"]) == 0
    assert capsys.readouterr().out == "q__r4\nq__r8\n"
    assert main(["run", str(cfg), "--list", "--only", "q__r8"]) == 0
    assert capsys.readouterr().out == "q__r8\n"  # a run name selects exactly that run: names cannot hold "__"
    assert main(["run", str(cfg), "--list", "--only", "q"]) == 0  # a model name: its runs
    assert capsys.readouterr().out == "q__r4\nq__r8\n"
    assert not (tmp_path / "out").exists()  # nothing written


def test_ray_missing_is_one_line_naming_the_extra(shapes_dir, tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", [R4])
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr("vlmtune.cli.load_cli_config", lambda *a, **k: pytest.fail("the config loaded before the Ray check"))
    assert main(["run", str(cfg), "--launcher", "ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --launcher ray: Ray is not installed — pip install 'vlmtune[ray]'"]
    assert not (tmp_path / "out").exists()


def test_user_errors_survive_pickling_with_their_parts():
    """Ray (and multiprocessing) pickle a task's exception; Exception's default pickling calls
    __init__ with the message alone, which a UserError (where, problem, fix) cannot take, so
    the driver would get Ray's UnserializableException and retry a deterministic error."""
    import pickle

    from vlmtune.errors import UserError
    from vlmtune.train.preempt import Preempted

    e = pickle.loads(pickle.dumps(UserError("data.train_file", "no such file", "check the path")))
    assert type(e) is UserError and (e.where, e.problem, e.fix) == ("data.train_file", "no such file", "check the path")
    assert str(e) == "data.train_file: no such file — check the path"
    p = pickle.loads(pickle.dumps(Preempted("run a", "stopped by SIGTERM", "rerun", 15)))
    assert isinstance(p, Preempted) and p.exit_code == 143 and p.where == "run a"

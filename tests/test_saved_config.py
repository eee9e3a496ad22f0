"""A run directory's config.yaml re-runs from any folder: every path in it is absolute, as the
original run resolved it (`Config.with_absolute_paths`, used by `train/rundir.py:
resolved_run_config`), and a rerun of the same command still matches it (grid)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env as _env
import yaml

from vlmtune.config import config_from_dict, load_config
from vlmtune.experiment.grid import _settings_differ
from vlmtune.train.rundir import RunDir, resolved_run_config



def _vlmtune(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vlmtune", *args], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, f"vlmtune {' '.join(args)} (in {cwd}) failed:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def _project(shapes_dir: Path, root: Path) -> Path:
    """A project written the seed's way, every path relative: data/train.csv (found from the
    working directory), cfg/test.csv (found from the config's folder), images named relative to
    the working directory (shapes/images/..., the fallback after the data file's folder), and
    output_dir `out`."""
    proj = root / "proj"
    shutil.copytree(shapes_dir / "images", proj / "shapes" / "images")
    (proj / "data").mkdir()
    (proj / "cfg").mkdir()
    for split, dest in (("train", proj / "data" / "train.csv"), ("test", proj / "cfg" / "test.csv")):
        text = (shapes_dir / f"{split}.csv").read_text()
        assert text.count("\nimages/") == len(text.splitlines()) - 1  # url first, relative to the data file's folder
        dest.write_text(text.replace("\nimages/", "\nshapes/images/"))
    cfg = {
        "experiment_name": "saved",
        "output_dir": "out",
        "data": {"train_csv": "data/train.csv", "test_csv": "test.csv"},
        "models": [{"name": "q", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 3136}],
        "lora_variants": [{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.0}],
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "logging_steps": 1,
                     "save_strategy": "steps", "save_steps": 2, "generation_max_new_tokens": 2},
        "evaluation": {"enabled": True, "batch_size": 8, "max_samples": 4, "metrics": ["exact_match"]},
    }
    (proj / "cfg" / "exp.yaml").write_text(yaml.safe_dump(cfg))
    return proj


def test_a_saved_config_reruns_from_any_folder(shapes_dir, tmp_path):
    proj = _project(shapes_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _vlmtune(proj, "run", "cfg/exp.yaml")
    run = proj / "out" / "q__r8"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["output_dir"] == str(proj / "out")
    assert saved["data"]["train_csv"] == str(proj / "data" / "train.csv")
    assert saved["data"]["test_csv"] == str(proj / "cfg" / "test.csv")  # found beside the config, as the run found it
    assert saved["data"]["image_fallback_dir"] == str(proj)  # images named relative to the original working directory
    assert saved["models"][0]["hf_model_id"] == "tiny:qwen2_5_vl"  # not a path: left alone

    # The same command from the same folder matches the saved settings: reused, not "changed".
    r = _vlmtune(proj, "run", "cfg/exp.yaml")
    assert "q__r8: complete (reused)" in r.stdout and "different" not in r.stdout + r.stderr

    # From another folder: preview and evaluate the run by its saved config.
    p = _vlmtune(elsewhere, "preview", str(run / "config.yaml"), "--n", "2", "--json")
    assert [json.loads(l)["id"] for l in p.stdout.splitlines()] == ["train.csv:2", "train.csv:3"]
    p = _vlmtune(elsewhere, "preview", str(run / "config.yaml"), "--n", "1", "--json", "--split", "test")
    assert json.loads(p.stdout)["id"] == "test.csv:2"
    _vlmtune(elsewhere, "evaluate", "--run", str(run), "--csv", str(shapes_dir / "test.csv"), "--limit", "2", "--max-new-tokens", "2")
    assert len((run / "eval" / "test" / "predictions.jsonl").read_text().splitlines()) == 2

    # `train RUN/config.yaml` from another folder continues this run, in place.
    before = (run / "metrics.json").stat().st_mtime_ns
    t = _vlmtune(elsewhere, "train", str(run / "config.yaml"))
    assert t.stdout.strip().endswith(f"-> {run}")
    assert sorted(p.name for p in elsewhere.iterdir()) == [], "a run tree was started in the other folder"
    m = json.loads((run / "metrics.json").read_text())
    assert (run / "metrics.json").stat().st_mtime_ns != before and m["global_step"] == 2 and "checkpoint-2" in (m["resumed_from"] or "")
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved  # rewritten the same
    assert sorted(p.name for p in (proj / "out").iterdir() if p.is_dir()) == ["q__r8"]

    # And the original command still finds the run unchanged.
    r = _vlmtune(proj, "run", "cfg/exp.yaml")
    assert "q__r8: complete (reused)" in r.stdout and "different" not in r.stdout + r.stderr


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_with_absolute_paths_resolves_each_path_as_it_is_read(here):
    (here / "cfgdir").mkdir()
    (here / "cfgdir" / "val.csv").write_text("x")  # only beside the config
    (here / "train.csv").write_text("x")  # in the working directory
    (here / "cfgdir" / "imgs").mkdir()  # image_root only beside the config
    (here / "models" / "m").mkdir(parents=True)
    raw = {"output_dir": "out", "data": {"train_csv": "train.csv", "val_csv": "val.csv", "test_jsonl": "missing.jsonl", "image_root": "imgs"},
           "models": [{"name": "a", "hf_model_id": "models/m"}, {"name": "b", "hf_model_id": "org/hub-model"}, {"name": "c", "hf_model_id": "tiny:llava"}],
           "training": {"deepspeed": "ds.json"}}
    cfg = config_from_dict(raw, "c.yaml", str(here / "cfgdir"))
    a = cfg.with_absolute_paths()
    assert a.output_dir == str(here / "out")
    assert (a.data.train_csv, a.data.val_csv, a.data.test_jsonl) == (str(here / "train.csv"), str(here / "cfgdir" / "val.csv"), str(here / "cfgdir" / "missing.jsonl"))
    assert a.data.image_root == str(here / "cfgdir" / "imgs") and a.data.image_fallback_dir is None
    assert [m.hf_model_id for m in a.models] == [str(here / "models" / "m"), "org/hub-model", "tiny:llava"]
    assert a.training.deepspeed == str(here / "ds.json")
    assert cfg.data.train_csv == "train.csv" and cfg.models[0].hf_model_id == "models/m"  # the original is unchanged
    # Idempotent, and the same from any folder once absolute.
    os.chdir(here / "cfgdir")
    assert a.with_absolute_paths().to_dict() == a.to_dict()
    # Without image_root, the working directory images fall back to is pinned; the default output_dir too.
    b = config_from_dict({"data": {"train_csv": str(here / "train.csv")}, "models": [{"name": "a", "hf_model_id": "tiny:llava"}]}).with_absolute_paths()
    assert b.data.image_fallback_dir == str(here / "cfgdir") and b.output_dir == str(here / "cfgdir" / "results" / "vlmtune")


def test_the_grid_compares_saved_paths_like_with_like(here):
    """A config.yaml saved with relative paths (as before they were saved absolute) or absolute
    ones matches the same command rerun from the same folder; a different model does not."""
    (here / "models" / "m").mkdir(parents=True)
    (here / "models" / "other").mkdir(parents=True)
    (here / "train.csv").write_text("x")
    path = here / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "out", "data": {"train_csv": "train.csv"},
                                    "models": [{"name": "a", "hf_model_id": "./models/m"}], "lora_variants": [{"name": "r4", "r": 4}]}))
    cfg = load_config(path)
    m, v = cfg.models[0], cfg.variants()[0]
    rd = RunDir(here / "out" / "a__r4")
    rd.path.mkdir(parents=True)
    resolved = resolved_run_config(cfg, m, v)
    assert resolved["models"][0]["hf_model_id"] == str(here / "models" / "m")
    legacy = {**resolved, "output_dir": "out", "data": {**resolved["data"], "train_csv": "train.csv", "image_fallback_dir": None},
              "models": [{**resolved["models"][0], "hf_model_id": "./models/m"}]}
    for saved in (resolved, legacy):
        rd.config.write_text(yaml.safe_dump(saved))
        assert _settings_differ(rd, cfg, m, v) == []
    rd.config.write_text(yaml.safe_dump({**legacy, "models": [{**legacy["models"][0], "hf_model_id": "./models/other"}]}))
    assert _settings_differ(rd, cfg, m, v) == ["models"]

"""Faults survived, nothing lost (Reliability II), on the real entry point
(`python -m vlmtune train CFG`) with a tiny model:

- SIGTERM (preemption; Ctrl-C is the same path with SIGINT) mid-training: a checkpoint of
  that step, exit 143 with one line saying how to resume, and the rerun ends exactly where an
  uninterrupted run ends;
- a full disk while writing a checkpoint, and while writing lora_adapter/ + final/: one line,
  every earlier output intact, and the rerun after "freeing space" completes;
- an output folder that is read-only or cannot be created: refused before anything loads;
- a checkpoint with its trainer_state.json missing: set aside with a warning, resumed from the
  one before;
- power loss: atomic writes fsync the file before the rename and the folder after it.

Faults are injected at exact points by a thin wrapper around the same CLI (a signal sent at
the start of a given step; ENOSPC raised by the file writers for a given path), so nothing
depends on timing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config, subprocess_env as _env
from vlmtune.train.checkpoints import checkpoint_problem

RUN = "q__r8"
TOL = 1e-6

# $VLMTUNE_TEST_FAULT: {"sigterm_at_step": N} sends SIGTERM to this process when optimizer step N
# begins; {"enospc": "SUBSTRING"} makes every weight/optimizer write to a path containing
# SUBSTRING fail with ENOSPC, like a full disk.
FAULT = r"""
import errno, json, os, runpy, signal
spec = json.loads(os.environ["VLMTUNE_TEST_FAULT"])
import torch, safetensors.torch

if "enospc" in spec:  # patched before transformers and peft bind these functions by name
    def full(path):
        if spec["enospc"] in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    for mod, name in ((torch, "save"), (safetensors.torch, "save_file")):
        orig = getattr(mod, name)
        def wrapped(obj, f, *a, _orig=orig, **k):
            full(f)
            return _orig(obj, f, *a, **k)
        setattr(mod, name, wrapped)
import transformers

class Signaller(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if spec.get("sigterm_at_step") == state.global_step + 1:
            os.kill(os.getpid(), signal.SIGTERM)

_init = transformers.Trainer.__init__
def _patched_init(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(Signaller())
transformers.Trainer.__init__ = _patched_init
runpy.run_module("vlmtune", run_name="__main__", alter_sys=True)
"""



def train(cfg: Path, fault: dict | None = None, *extra: str) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", FAULT] if fault else [sys.executable, "-m", "vlmtune"]
    env = _env(VLMTUNE_TEST_FAULT=json.dumps(fault)) if fault else _env()
    return subprocess.run([*head, "train", str(cfg), *extra], capture_output=True, text=True, env=env, timeout=600)


def _last_line(r: subprocess.CompletedProcess) -> str:
    return [line for line in r.stderr.splitlines() if line.strip()][-1]


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def _config(tmp: Path, data: Path) -> Path:
    # logging every step: a run stopped at any step logs the same windows as an uninterrupted one
    t = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "logging_steps": 1, "seed": 3}
    return write_config(tmp / "c.yaml", data, tmp / "out", training=t, evaluation={"enabled": False},
                        lora_variants=[{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.1}])


def _same_as(run: Path, ref: Path) -> None:
    m, r = (json.loads((p / "metrics.json").read_text()) for p in (run, ref))
    assert m["global_step"] == r["global_step"]
    assert [h["step"] for h in m["train_loss_history"]] == [h["step"] for h in r["train_loss_history"]]
    for a, b in zip(m["train_loss_history"], r["train_loss_history"]):
        assert abs(a["loss"] - b["loss"]) < TOL, (a, b)
    assert (run / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()
    assert not list(run.glob(".*")), list(run.glob(".*"))


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults-ref")
    _ok(train(_config(tmp, shapes_dir)))
    return tmp / "out" / RUN


def test_sigterm_saves_a_checkpoint_exits_with_a_resume_line_and_the_rerun_matches(reference, shapes_dir, tmp_path):
    cfg = _config(tmp_path, shapes_dir)
    run = tmp_path / "out" / RUN
    r = train(cfg, {"sigterm_at_step": 3})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert _last_line(r) == (f"stopped: run {RUN}: stopped by SIGTERM after optimizer step 3 of 6; checkpoint-3 was saved"
                             " — rerun the same command to resume from it")
    assert "Traceback" not in r.stderr
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-3") is None  # step 3 saved, though save_steps is 2
    assert not (run / "metrics.json").exists() and not (run / "final").exists()
    again = train(cfg)
    _ok(again)
    assert "resuming from" in again.stderr and "checkpoint-3" in again.stderr
    _same_as(run, reference)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(reference, shapes_dir, tmp_path):
    cfg = _config(tmp_path, shapes_dir)
    run = tmp_path / "out" / RUN
    r = train(cfg, {"enospc": "checkpoint-4"})
    assert r.returncode == 1
    last = _last_line(r)
    assert last.startswith(f"error: run {RUN}: no space left on the device while writing a checkpoint"), r.stderr[-3000:]
    assert last.endswith("(the rerun resumes from checkpoint-2)") and "Traceback" not in r.stderr
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-2") is None
    assert not (run / "metrics.json").exists()
    # space freed: the same command moves the torn checkpoint-4 aside and ends like the reference
    again = train(cfg)
    _ok(again)
    assert "checkpoint-4 is incomplete" in again.stderr
    _same_as(run, reference)


def test_disk_full_while_writing_the_outputs_keeps_the_previous_ones(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference.parent, out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((reference.parent.parent / "c.yaml").read_text().replace(str(reference.parent), str(out)))
    run = out / RUN
    # config.yaml is rewritten when a run starts (it describes the run in progress, here one
    # continued to 8 steps); every output of the finished run must survive as it was
    def outputs() -> dict:
        return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "checkpoints" not in p.parts and p.name != "config.yaml"}

    before = outputs()
    for target in (".lora_adapter.tmp", ".final.tmp"):
        r = train(cfg, {"enospc": target}, "--set", "training.max_steps=8")
        assert r.returncode == 1, r.stderr[-3000:]
        assert _last_line(r).startswith(f"error: run {RUN}: no space left on the device while writing lora_adapter/, final/ and metrics.json")
        assert outputs() == before, target  # adapter, merged model, metrics: all the previous run's
        assert not list(run.glob(".*")), list(run.glob(".*"))  # nothing half-written left


@pytest.mark.parametrize("where", ["read_only", "not_creatable"])
def test_unwritable_output_dir_is_refused_before_anything_loads(shapes_dir, tmp_path, where):
    # /sys refuses writes even to root (CI runs as root, so chmod would not do)
    out = "/sys/kernel/vlmtune-out" if where == "read_only" else str(tmp_path / "a_file" / "out")
    (tmp_path / "a_file").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, Path(out), evaluation={"enabled": False})
    r = train(cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = _last_line(r)
    assert last.startswith(f"error: output_dir: {out} "), last
    assert ("cannot be created in /sys/kernel" in last) if where == "read_only" else ("a_file is a file" in last)
    assert "loading" not in r.stderr.lower() or "model" not in r.stderr.lower()


def test_checkpoint_without_trainer_state_is_set_aside_and_the_one_before_used(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference.parent, out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((reference.parent.parent / "c.yaml").read_text().replace(str(reference.parent), str(out)))
    ckpts = out / RUN / "checkpoints"
    (ckpts / "checkpoint-6" / "trainer_state.json").unlink()  # damaged by hand
    for f in ("metrics.json",):
        (out / RUN / f).unlink()
    shutil.rmtree(out / RUN / "final")
    r = train(cfg)
    _ok(r)
    assert "checkpoint-6 is incomplete (trainer_state.json is missing" in r.stderr
    assert "resuming from" in r.stderr and "checkpoint-4" in r.stderr
    assert (ckpts / "incomplete-checkpoint-6").is_dir()  # kept for a post-mortem, not deleted
    _same_as(out / RUN, reference)


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    """Power loss: a result reported written must be on disk, its name included."""
    from vlmtune.io import atomic_write_json
    from vlmtune.train.rundir import save_dir_atomically

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert any(s.startswith(str(tmp_path / ".metrics.json.")) for s in synced)  # the data, before the rename
    assert synced[-1] == str(tmp_path)  # the rename itself
    synced.clear()
    save_dir_atomically(tmp_path / "final", lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(b"w")))
    assert str(tmp_path / ".final.tmp" / "model.safetensors") in synced and str(tmp_path / ".final.tmp") in synced
    assert synced[-1] == str(tmp_path) and (tmp_path / "final" / "model.safetensors").read_bytes() == b"w"


def test_every_row_of_docs_reliability_names_a_real_test():
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| fault") and "---" not in line]
    assert len(rows) >= 14
    defined = {m for f in (root / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)\(", f.read_text(), re.M)}
    for row in rows:
        names = re.findall(r"(?:::)(test_\w+)`", row)
        assert names, f"no test named in: {row[:80]}"
        assert set(names) <= defined, set(names) - defined


def test_a_full_finetune_resumes_from_its_checkpoint_weights(shapes_dir, tmp_path):
    """Without LoRA the checkpoint is a whole model.safetensors in the hub's key layout, not the
    runtime one: a resume must load it (transformers' Trainer loads it non-strictly, matches
    no key, and would go on from the initial weights with only a warning)."""
    t = {"training_mode": "projector", "lr_scheduler_type": "constant", "save_steps": 2, "logging_steps": 1, "seed": 5}
    ref = write_config(tmp_path / "ref.yaml", shapes_dir, tmp_path / "ref", training={**t, "max_steps": 4}, evaluation={"enabled": False})
    _ok(train(ref))
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", training={**t, "max_steps": 2}, evaluation={"enabled": False})
    _ok(train(cfg))
    r = train(cfg, None, "--set", "training.max_steps=4")
    _ok(r)
    assert "resuming from" in r.stderr and "checkpoint-2" in r.stderr
    assert not (tmp_path / "out" / RUN / "lora_adapter").exists()  # a plain model: no adapter
    _same_as(tmp_path / "out" / RUN, tmp_path / "ref" / RUN)

"""Multi-process training on CPU: `torchrun --nproc_per_node 2 -m vlmtune train CONFIG` with
DDP and with FSDP (`fsdp: "full_shard auto_wrap"`, seed 001's fsdp_config), on a tiny
Qwen2.5-VL with LoRA on the LLM and the projector trained fully (two LR groups).

- the losses of a 2-process run (2 samples per rank) equal a single-process run with the
  same global batch (4) within 1e-4, step by step;
- under FSDP each rank holds about half of the parameters;
- exactly one set of outputs is written (rank 0), and `final/` loads with plain
  transformers;
- a 2-process FSDP run killed right after a checkpoint and rerun with the same command ends
  with the same losses as the uninterrupted 2-process run.

Every run is a real subprocess with one torch thread per process (gloo on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_config, subprocess_env as _env

RUN = "q__r8"
TOL = 1e-4
SEED_FSDP_CONFIG = {  # seed 001, as written there
    "fsdp_min_num_params": 0, "fsdp_backward_prefetch": "backward_pre", "fsdp_forward_prefetch": False,
    "fsdp_limit_all_gathers": True, "fsdp_use_orig_params": False, "fsdp_cpu_offload": False, "fsdp_sync_module_states": True,
}

# `python -m vlmtune` under torchrun, plus a callback that SIGKILLs rank 0 once
# checkpoint-N is written (torchrun then stops the other rank): a preempted job.
KILLER = r"""
import os, runpy, signal
import transformers
N = int(os.environ["VLMTUNE_TEST_KILL_AFTER_SAVE"])
class Killer(transformers.TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == N and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)
_init = transformers.Trainer.__init__
def _patched(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(Killer())
transformers.Trainer.__init__ = _patched
runpy.run_module("vlmtune", run_name="__main__", alter_sys=True)
"""



def _torchrun(cfg: Path, kill_after_save: int | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if kill_after_save is None:
        cmd, env = [*head, "-m", "vlmtune", "train", str(cfg)], _env()
    else:
        script = cfg.parent / "killer.py"
        script.write_text(KILLER)
        cmd, env = [*head, str(script), "train", str(cfg)], _env(VLMTUNE_TEST_KILL_AFTER_SAVE=str(kill_after_save))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _single(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtune", "train", str(cfg)], capture_output=True, text=True, env=_env(), timeout=600)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-4000:]


def _config(tmp: Path, data: Path, name: str, batch: int, **training) -> Path:
    out = tmp / name
    # dropout 0: the two layouts draw different dropout masks, which would make the losses
    # differ for reasons that have nothing to do with synchronisation
    # the projector at half the LLM's learning rate: if sharding lost the per-part optimizer
    # groups, the losses would no longer match the single process
    t = {"max_steps": 4, "per_device_train_batch_size": batch, "save_steps": 2, "save_total_limit": 2, "logging_steps": 1,
         "learning_rate": "1e-3", "seed": 7, "parts": {"projector": {"lr_multiplier": 0.5}}, **training}
    return write_config(tmp / f"{name}.yaml", data, out, training=t, evaluation={"enabled": False},
                        lora_variants=[{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.0}])


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "metrics.json").read_text())["train_loss_history"]]


def _assert_one_set_of_outputs(run: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_step"] == 4
    for rel in ("config.yaml", "parameter_report.json", "final/model.safetensors", "lora_adapter/adapter_model.safetensors"):
        assert (run / rel).is_file(), rel
    assert not list(run.glob(".*")), list(run.glob(".*"))  # no temp or half-swapped outputs left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(str(run / "final"))
    assert all(torch.isfinite(p).all() for p in final.parameters())


@pytest.fixture(scope="module")
def single_losses(shapes_dir, tmp_path_factory) -> list[float]:
    """One process, batch 4: the reference for both engines."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = _config(tmp, shapes_dir, "out", batch=4)
    _ok(_single(cfg))
    return _losses(tmp / "out" / RUN)


def test_ddp_two_processes_equal_one_process(single_losses, shapes_dir, tmp_path):
    cfg = _config(tmp_path, shapes_dir, "out", batch=2, ddp_find_unused_parameters=False)
    r = _torchrun(cfg)
    _ok(r)
    run = tmp_path / "out" / RUN
    losses = _losses(run)
    assert len(losses) == len(single_losses) == 4
    assert max(abs(a - b) for a, b in zip(losses, single_losses)) < TOL, (losses, single_losses)
    _assert_one_set_of_outputs(run)
    # log lines print once per job, not once per rank (rank 0 logs; other ranks only errors)
    lines = [line for line in r.stderr.splitlines() if line.startswith(("train: ", "val: ", "test: ", "[run ", "run "))]
    assert lines and len(lines) == len(set(lines)), lines


@pytest.fixture(scope="module")
def fsdp_run(shapes_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = _config(tmp, shapes_dir, "out", batch=2, fsdp="full_shard auto_wrap", fsdp_config=SEED_FSDP_CONFIG,
                  ddp_find_unused_parameters=False)
    r = _torchrun(cfg)
    _ok(r)
    return tmp / "out" / RUN, r


def test_fsdp_two_processes_shard_and_equal_one_process(single_losses, fsdp_run):
    run, r = fsdp_run
    held = [line for line in r.stderr.splitlines() if "holds" in line and "parameter elements" in line]
    assert len(held) == 2, r.stderr[-3000:]
    for line in held:  # "rank R holds X of Y parameter elements (Z%)"
        words = line.split()
        x, y = int(words[words.index("holds") + 1]), int(words[words.index("of") + 1])
        assert 0.45 < x / y < 0.55, line
    losses = _losses(run)
    assert max(abs(a - b) for a, b in zip(losses, single_losses)) < TOL, (losses, single_losses)
    _assert_one_set_of_outputs(run)


def test_fsdp_killed_and_rerun_ends_like_uninterrupted(fsdp_run, shapes_dir, tmp_path):
    ref, _ = fsdp_run
    cfg = _config(tmp_path, shapes_dir, "out", batch=2, fsdp="full_shard auto_wrap", fsdp_config=SEED_FSDP_CONFIG,
                  ddp_find_unused_parameters=False)
    run = tmp_path / "out" / RUN
    killed = _torchrun(cfg, kill_after_save=2)
    assert killed.returncode != 0
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file() and not (run / "metrics.json").exists()
    again = _torchrun(cfg)
    _ok(again)
    assert "resuming from" in again.stderr and "checkpoint-2" in again.stderr
    losses, want = _losses(run), _losses(ref)
    assert len(losses) == len(want) and max(abs(a - b) for a, b in zip(losses, want)) < TOL, (losses, want)
    assert abs(json.loads((run / "metrics.json").read_text())["final_train_loss"] - json.loads((ref / "metrics.json").read_text())["final_train_loss"]) < TOL


def test_fsdp_in_one_process_is_one_line(shapes_dir, tmp_path):
    cfg = _config(tmp_path, shapes_dir, "out", batch=2, fsdp="full_shard auto_wrap")
    r = _single(cfg)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: training.fsdp: 'full_shard auto_wrap' needs several processes"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_seed001_example_config_loads_and_its_fsdp_keys_are_known():
    from vlmtune.config import load_config
    from vlmtune.train.fsdp import normalize_fsdp_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "seed001_fsdp.yaml")
    t = cfg.training
    assert t.fsdp == "full_shard auto_wrap" and t.mixed_precision == "bf16" and t.ddp_find_unused_parameters is False
    assert set(normalize_fsdp_config(t.fsdp_config)) == {k[len("fsdp_"):] for k in SEED_FSDP_CONFIG}
    for name in ("ds_zero2.json", "ds_zero3.json"):
        assert json.loads((root / "examples" / name).read_text())["zero_optimization"]["stage"] in (2, 3)

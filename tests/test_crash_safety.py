"""Crash safety of `vlmtune train`, on the real entry point (`python -m vlmtune.cli train CFG`)
with a tiny model on CPU:

- SIGKILL right after the first checkpoint, in the middle of a step of the second epoch, in
  the middle of writing a later checkpoint's optimizer file, and after training but before
  the outputs are written; rerunning the same command after each kill ends with the loss
  history, final loss and weights of an uninterrupted run;
- a half-written latest checkpoint is detected, moved aside (kept) and the previous one used;
- a NaN loss at a known step stops the run with one line naming the step and the batch's
  samples (exit 1) and leaves the last good checkpoint as it was; `nan_policy: skip_batch`
  skips exactly the poisoned batches without touching weights or optimizer moments.

Kills are real SIGKILLs that the training process sends itself at an exact point (a
callback added through a thin wrapper around the same CLI), so the kill points do not
depend on timing. Every run is a subprocess with one torch thread: a fresh interpreter like a
user's rerun, the same float reductions in every run, and no OpenMP spin on a busy 2-core
machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_config, subprocess_env as _env
from vlmtune.train.checkpoints import checkpoint_problem, last_good_checkpoint

RUN = "q__r8"
TOL = 1e-4

# Runs `vlmtune.cli` exactly like `python -m vlmtune.cli`, after adding a callback that SIGKILLs
# this process at the point named in $VLMTUNE_TEST_KILL:
#   {"after_save": N}    once checkpoint-N is completely written (and older ones rotated);
#   {"before_update": N} during optimizer step N, after forward/backward, before the update;
#   {"torn_optimizer": N} while writing checkpoint-N/optimizer.pt: half of its bytes hit the
#                         disk, then the kill (weights are already there, the rest is not);
#   {"after_training": 1} once training ended, before final/, lora_adapter/, metrics.json.
KILLER = r"""
import io, json, os, runpy, signal
spec = json.loads(os.environ["VLMTUNE_TEST_KILL"])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

import torch
import transformers

class Killer(transformers.TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if spec.get("after_save") == state.global_step:
            die()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if spec.get("before_update") == state.global_step + 1:
            die()

    def on_train_end(self, args, state, control, **kw):
        if spec.get("after_training"):
            die()

_init = transformers.Trainer.__init__
def _patched_init(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(Killer())
transformers.Trainer.__init__ = _patched_init

if "torn_optimizer" in spec:
    _save = torch.save
    target = os.path.join("checkpoint-%d" % spec["torn_optimizer"], "optimizer.pt")
    def _torn_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(target):
            buf = io.BytesIO()
            _save(obj, buf, *a, **k)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        return _save(obj, f, *a, **k)
    torch.save = _torn_save

runpy.run_module("vlmtune.cli", run_name="__main__", alter_sys=True)
"""



def train(cfg: Path, kill: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m vlmtune.cli train cfg` (with a kill point: the same CLI through KILLER)."""
    head = [sys.executable, "-c", KILLER] if kill else [sys.executable, "-m", "vlmtune.cli"]
    env = _env(VLMTUNE_TEST_KILL=json.dumps(kill)) if kill else _env()
    return subprocess.run([*head, "train", str(cfg)], capture_output=True, text=True, env=env, timeout=600)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def _killed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _assert_same_training(run: Path, ref: Path) -> None:
    """Same final loss and the same loss history, entry for entry, as the reference run."""
    m, r = _metrics(run), _metrics(ref)
    assert m["global_step"] == r["global_step"]
    assert abs(m["final_train_loss"] - r["final_train_loss"]) < TOL, (m["final_train_loss"], r["final_train_loss"])
    assert [h["step"] for h in m["train_loss_history"]] == [h["step"] for h in r["train_loss_history"]]
    for a, b in zip(m["train_loss_history"], r["train_loss_history"]):
        assert abs(a["loss"] - b["loss"]) < TOL, (a, b)
    for rel in ("final/model.safetensors", "final/config.json", "lora_adapter/adapter_model.safetensors", "metrics.json"):
        assert (run / rel).is_file(), rel
    assert not list(run.glob(".*")), list(run.glob(".*"))  # no temp or half-swapped outputs left


def _config(tmp: Path, data: Path, out: Path, **training) -> Path:
    # 24 samples, batch 4: 6 steps per epoch; 11 steps end mid-epoch (the last checkpoint is
    # then mid-epoch too). Checkpoints every 2 steps and at the end, logs every 5 (so a resumed
    # run's log windows only match if logs align with checkpoints), LoRA dropout so a resume
    # that lost the RNG state would give other losses.
    t = {"max_steps": 11, "save_steps": 2, "save_total_limit": 2, "logging_steps": 5, "seed": 42, **training}
    return write_config(tmp / f"{out.name}.yaml", data, out, training=t, evaluation={"enabled": False},
                        lora_variants=[{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.1}])


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run: (its config, its run folder)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp, shapes_dir, tmp / "out")
    _ok(train(cfg))
    return cfg, tmp / "out" / RUN


def test_sigkill_at_four_points_then_rerun_matches_uninterrupted(reference, shapes_dir, tmp_path):
    _, ref = reference
    cfg = _config(tmp_path, shapes_dir, tmp_path / "out")
    run = tmp_path / "out" / RUN
    ckpts = run / "checkpoints"

    # 1. right after the first checkpoint is written
    _killed(train(cfg, {"after_save": 2}))
    assert checkpoint_problem(ckpts / "checkpoint-2") is None
    assert not (run / "metrics.json").exists() and not (run / "final").exists()

    # 2. in the second epoch, during step 7 (gradients computed, update not yet applied)
    r = train(cfg, {"before_update": 7})
    _killed(r)
    assert f"resuming from {ckpts / 'checkpoint-2'}" in r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4", "checkpoint-6"]

    # 3. while checkpoint-10's optimizer.pt is being written (resumed at the epoch boundary)
    r = train(cfg, {"torn_optimizer": 10})
    _killed(r)
    assert f"resuming from {ckpts / 'checkpoint-6'}" in r.stderr
    assert "optimizer.pt is truncated" in (checkpoint_problem(ckpts / "checkpoint-10") or "")

    # 4. after the last step, before any output is written; this rerun sets the torn
    # checkpoint-10 aside and resumes from checkpoint-8 (mid-epoch)
    r = train(cfg, {"after_training": 1})
    _killed(r)
    assert "checkpoint-10 is incomplete (optimizer.pt is truncated" in r.stderr
    assert f"resuming from {ckpts / 'checkpoint-8'}" in r.stderr
    assert (ckpts / "incomplete-checkpoint-10" / "adapter_model.safetensors").is_file()  # kept, not deleted
    assert checkpoint_problem(ckpts / "checkpoint-11") is None and not (run / "metrics.json").exists()

    # the same command again: resumes from the final checkpoint-11 and trains nothing more
    r = train(cfg)
    _ok(r)
    assert f"resuming from {ckpts / 'checkpoint-11'}" in r.stderr
    assert _metrics(run)["resumed_from"] == str(ckpts / "checkpoint-11")
    _assert_same_training(run, ref)
    assert (run / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()


def test_half_written_checkpoint_falls_back_to_previous(reference, tmp_path):
    cfg_ref, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref.parent, out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(cfg_ref.read_text().replace(str(ref.parent), str(out)))
    ckpts = out / RUN / "checkpoints"
    weights = ckpts / "checkpoint-11" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:  # a kill while the latest weights were being written
        f.truncate(weights.stat().st_size // 2)
    size = weights.stat().st_size

    r = train(cfg)
    _ok(r)
    lines = [l for l in r.stderr.splitlines() if "is incomplete" in l]
    assert len(lines) == 1 and "checkpoint-11 is incomplete (adapter_model.safetensors is truncated" in lines[0]
    assert "moved it to incomplete-checkpoint-11; resuming from checkpoint-10" in lines[0]
    assert (ckpts / "incomplete-checkpoint-11" / "adapter_model.safetensors").stat().st_size == size
    assert _metrics(out / RUN)["resumed_from"] == str(ckpts / "checkpoint-10")
    assert checkpoint_problem(ckpts / "checkpoint-11") is None  # rewritten whole
    _assert_same_training(out / RUN, ref)


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


DAMAGE = {
    "no trainer_state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "cut trainer_state": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
    "no weights": (lambda c: (c / "adapter_model.safetensors").unlink(), "no model or adapter weights"),
    "cut weights": (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors is truncated"),
    "cut weights header": (lambda c: (c / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "adapter_model.safetensors is truncated"),
    "no adapter_config": (lambda c: (c / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "no optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "cut optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "no scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "cut scheduler": (lambda c: _truncate(c / "scheduler.pt"), "scheduler.pt is truncated"),
    "no rng": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "empty rng": (lambda c: (c / "rng_state.pth").write_bytes(b""), "rng_state.pth is truncated"),
    "wrong step": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "global_step=3"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_last_good_checkpoint_rejects_each_kind_of_damage(reference, tmp_path, damage):
    _, ref = reference
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ref / "checkpoints", ckpts)
    assert last_good_checkpoint(ckpts, move_aside=False) == str(ckpts / "checkpoint-11")
    hurt, reason = DAMAGE[damage]
    hurt(ckpts / "checkpoint-11")
    assert reason in (checkpoint_problem(ckpts / "checkpoint-11") or "")
    assert checkpoint_problem(ckpts / "checkpoint-10") is None
    assert last_good_checkpoint(ckpts) == str(ckpts / "checkpoint-10")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-10", "incomplete-checkpoint-11"]
    # a second broken checkpoint-11 (killed again at the same step) does not clobber the first
    shutil.copytree(ckpts / "incomplete-checkpoint-11", ckpts / "checkpoint-11")
    assert last_good_checkpoint(ckpts) == str(ckpts / "checkpoint-10")
    assert (ckpts / "incomplete-checkpoint-11.2").is_dir()


def test_last_good_checkpoint_without_any():
    assert last_good_checkpoint("/nonexistent/checkpoints") is None


# ---- NaN / inf ----------------------------------------------------------------------------

POISON_ROW = 13  # 0-based data row of train.csv, i.e. line 15: "train.csv:15"
# With seed 42 the seeded sampler's epoch-0 order puts rows 14, 17, 4, 13 in the third batch
# and row 13 in the third batch of epoch 1 (step 9). Those rows are lines 16, 19, 6, 15.
NAN_STEP = 3
NAN_BATCH = {"train.csv:16", "train.csv:19", "train.csv:6", "train.csv:15"}
POISON_TOKEN = "@"  # appears nowhere but in the poisoned sample (not in the chat template either)


@pytest.fixture(scope="module")
def poisoned(shapes_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, model folder): the shapes data with '@' in one question, and the tiny
    Qwen2.5-VL whose input embedding of '@' is NaN. The output head gets an untied, clean copy
    of the embeddings, so only a sequence that *contains* '@' goes NaN (its positions after
    '@' through attention), i.e. only the batch holding that sample."""
    from vlmtune.models.tiny import tiny_dir
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("poisoned")
    data = tmp / "data"
    shutil.copytree(shapes_dir, data)
    rows = list(csv.reader((data / "train.csv").open()))
    head = rows[0]
    q = head.index("instruction")
    rows[POISON_ROW + 1][q] = rows[POISON_ROW + 1][q].rstrip("?") + f" {POISON_TOKEN}?"
    with (data / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)

    model = tmp / "model"
    shutil.copytree(tiny_dir("tiny:qwen2_5_vl"), model)
    cfg = json.loads((model / "config.json").read_text())

    def untie(d):
        for k, v in d.items():
            if k == "tie_word_embeddings":
                d[k] = False
            elif isinstance(v, dict):
                untie(v)
    untie(cfg)
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    w = load_file(model / "model.safetensors")
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    w["lm_head.weight"] = w[key].clone()
    token = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(POISON_TOKEN)
    w[key][token] = float("nan")
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    return data, model


def _poisoned_config(tmp: Path, poisoned: tuple[Path, Path], **training) -> Path:
    data, model = poisoned
    t = {"save_steps": 1, "logging_steps": 1, "seed": 42, **training}
    return write_config(tmp / "c.yaml", data, tmp / "out", training=t, evaluation={"enabled": False},
                        models=[{"name": "q", "hf_model_id": str(model), "min_pixels": 3136, "max_pixels": 3136}])


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_nan_stop_names_step_and_samples_and_keeps_last_good_checkpoint(poisoned, tmp_path):
    cfg = _poisoned_config(tmp_path, poisoned, max_steps=6, save_total_limit=2, nan_policy="stop")
    run = tmp_path / "out" / RUN
    ckpts = run / "checkpoints"

    r = train(cfg)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1]
    line = errors[0]
    assert line.startswith(f"error: run {RUN}: loss is nan at optimizer step {NAN_STEP} ")
    named = set(line.split(" on samples ")[1].split(";")[0].split(", "))
    assert named == NAN_BATCH
    assert "checkpoint-2 is kept" in line and "nan_policy: skip_batch" in line

    # nothing from the bad step was written: no checkpoint-3, no outputs, checkpoint-2 whole
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert last_good_checkpoint(ckpts, move_aside=False) == str(ckpts / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in load_file(ckpts / "checkpoint-2" / "adapter_model.safetensors").values())
    for out in ("final", "lora_adapter", "metrics.json"):
        assert not (run / out).exists(), out

    # the same command again resumes from checkpoint-2, meets the same batch, stops the same
    # way, and leaves checkpoint-2 byte for byte as it was
    before = _hashes(ckpts / "checkpoint-2")
    r2 = train(cfg)
    assert r2.returncode == 1 and r2.stderr.strip().splitlines()[-1] == line
    assert _hashes(ckpts / "checkpoint-2") == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_nan_skip_batch_skips_exactly_the_poisoned_updates(poisoned, tmp_path):
    cfg = _poisoned_config(tmp_path, poisoned, max_steps=12, save_total_limit=None, nan_policy="skip_batch")
    run = tmp_path / "out" / RUN
    ckpts = run / "checkpoints"

    r = train(cfg)
    _ok(r)
    m = _metrics(run)
    skipped = m["skipped_nan_batches"]
    assert skipped["count"] == 2 and skipped["steps"] == [NAN_STEP, 9]
    assert set(skipped["batches"][0]["samples"]) == NAN_BATCH
    assert all("train.csv:15" in b["samples"] and "nan" in b["reason"] for b in skipped["batches"])
    assert m["global_step"] == 12 and m["final_train_loss"] == m["final_train_loss"]  # finite, not NaN
    assert sum("update skipped" in l for l in r.stderr.splitlines()) == 2

    def state(step: int) -> tuple[dict, dict]:
        c = ckpts / f"checkpoint-{step}"
        return load_file(c / "adapter_model.safetensors"), torch.load(c / "optimizer.pt", weights_only=True)["state"]

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for bad in skipped["steps"]:
        (w0, o0), (w1, o1) = state(bad - 1), state(bad)
        assert same(w0, w1)  # no weight moved on the skipped step...
        assert all(same(o0[i], o1[i]) for i in o0) and o0.keys() == o1.keys()  # ...nor Adam's step count and moments
        (w2, _) = state(bad + 1)
        assert not same(w1, w2)  # while a normal step does update
    # everything trained is finite (the merged model's only NaNs are the poisoned frozen embedding row)
    assert all(torch.isfinite(t).all() for t in load_file(run / "lora_adapter" / "adapter_model.safetensors").values())
    assert all(torch.isfinite(t).all() for k, t in load_file(run / "final" / "model.safetensors").items() if not k.endswith("embed_tokens.weight"))


def test_kill_between_the_two_renames_of_an_output_swap_is_undone(tmp_path):
    """`final/` and `lora_adapter/` are swapped in by two renames; a kill between them leaves
    the previous complete folder at `.final.old` and none at `final/`: it comes back."""
    from vlmtune.train.rundir import save_dir_atomically as _save_dir_atomically, recover_swapped_dir

    final = tmp_path / "final"
    _save_dir_atomically(final, lambda d: (d.mkdir(), (d / "w").write_text("v1")))
    assert (final / "w").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # killed after `final` -> `.final.old`, with a new (maybe partial) `.final.tmp` beside it
    final.rename(tmp_path / ".final.old")
    (tmp_path / ".final.tmp").mkdir()
    recover_swapped_dir(final)
    assert (final / "w").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # killed after the swap, before `.final.old` was removed: the new one stays
    (tmp_path / ".final.old").mkdir()
    recover_swapped_dir(final)
    assert (final / "w").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


class _SqrtModel(torch.nn.Module):
    """loss = sum(sqrt(w) * x) at w = 0: a finite loss (0) whose gradient is inf."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x, labels=None):
        return {"loss": (torch.sqrt(self.w) * x[:, None]).sum()}


@pytest.mark.parametrize("policy", ["stop", "skip_batch"])
def test_non_finite_gradient_with_finite_loss_never_updates(tmp_path, policy):
    """The gradient half of the guard, on the Trainer itself (no model files needed)."""
    from transformers import TrainingArguments, default_data_collator

    from vlmtune.train.guard import NonFiniteLoss
    from vlmtune.train.samples import IndexCarryingCollator, IndexedDataset
    from vlmtune.train.trainer import VlmTrainer

    rows = [{"x": torch.tensor(1.0), "labels": torch.tensor(0)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False, label_names=["labels"])
    model = _SqrtModel()
    trainer = VlmTrainer(model=model, args=args, train_dataset=IndexedDataset(rows), data_collator=IndexCarryingCollator(default_data_collator),
                                  nan_policy=policy, sample_ids=[f"d.jsonl:{i + 1}" for i in range(4)], run_label="run t")
    if policy == "stop":
        with pytest.raises(NonFiniteLoss) as e:
            trainer.train()
        assert "gradient is not finite at optimizer step 1 " in str(e.value)
        named = str(e.value).split(" on samples ")[1].split(";")[0].split(", ")
        assert len(named) == 2 and set(named) <= {f"d.jsonl:{i + 1}" for i in range(4)}
    else:
        trainer.train()
        skipped = [h["nan_skipped_step"] for h in trainer.state.log_history if "nan_skipped_step" in h]
        assert skipped == [1, 2] and trainer.state.global_step == 2
    assert torch.equal(model.w.detach(), torch.zeros(2))  # never moved by an inf gradient

"""Precision as seed 001 means it: every trained tensor in the configured dtype (LoRA weights
included), float32 trainables under fp16 loss scaling, and a dtype check on resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from conftest import write_config
from vlmtune.train.precision import cast_trainables, trainable_dtype

RUN = "q__r8"


def _train(cfg: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vlmtune", "train", str(cfg)], capture_output=True, text=True, env=env, timeout=600)


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_bfloat16_run_keeps_lora_and_full_parts_in_bfloat16_and_refuses_a_float32_resume(shapes_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", evaluation={"enabled": False},
                       training={"max_steps": 2, "save_steps": 2})
    raw = yaml.safe_load(cfg.read_text())
    raw["models"][0]["torch_dtype"] = "bfloat16"
    cfg.write_text(yaml.safe_dump(raw))
    r = _train(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "out" / RUN
    # LoRA weights and the fully trained projector (modules_to_save) are bfloat16, like the base
    assert _dtypes(run / "lora_adapter" / "adapter_model.safetensors") == {"BF16"}
    assert _dtypes(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors") == {"BF16"}

    # the same run continued under float32: refused with one line naming both dtypes
    raw["models"][0]["torch_dtype"] = "float32"
    raw["training"]["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(raw))
    r = _train(cfg)
    assert r.returncode == 1
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: models[0].torch_dtype: checkpoint-2 holds bfloat16 weights but this run trains float32 ones"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2  # earlier outputs untouched


def test_trainable_dtype_rules():
    # seed 001: one dtype -- except that a GradScaler cannot unscale float16 gradients
    assert trainable_dtype(torch.bfloat16, "no") == torch.bfloat16
    assert trainable_dtype(torch.bfloat16, "bf16") == torch.bfloat16
    assert trainable_dtype(torch.float16, "fp16") == torch.float32
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.float16)
    m[0].requires_grad_(False)
    assert cast_trainables(m, torch.float32) == 2
    assert m[0].weight.dtype == torch.float16 and m[1].weight.dtype == m[1].bias.dtype == torch.float32

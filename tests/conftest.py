"""Shared fixtures: tiny models are built once per test session into a temp VLMTUNE_HOME,
and a small synthetic dataset is written once. Nothing here touches a hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

TINY_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava"]


def pytest_configure(config):
    import tempfile

    home = os.environ.get("VLMTUNE_TEST_HOME") or tempfile.mkdtemp(prefix="vlmtune-test-home-")
    os.environ["VLMTUNE_HOME"] = home
    os.environ["VLMTUNE_NO_PROGRESS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from vlmtune.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_dataset(out, n_train=24, n_val=8, n_test=8, image_size=56, seed=1)
    return out


def write_config(path: Path, data_dir: Path, out_dir: Path, **overrides) -> Path:
    """A small config over the synthetic data; `overrides` are merged per top-level key."""
    cfg = {
        "experiment_name": "t",
        "output_dir": str(out_dir),
        "data": {"train_csv": str(data_dir / "train.csv"), "val_csv": str(data_dir / "val.csv"), "test_csv": str(data_dir / "test.csv")},
        "models": [{"name": "q", "hf_model_id": "tiny:qwen2_5_vl", "min_pixels": 3136, "max_pixels": 3136}],
        "lora_variants": [{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.0}],
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "logging_steps": 1,
                     "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2, "generation_max_new_tokens": 4},
        "evaluation": {"enabled": True, "batch_size": 4},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path

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
    # remote code the tests write (test_remote_code.py) is copied here, not into ~/.cache
    os.environ.setdefault("HF_MODULES_CACHE", os.path.join(home, "hf_modules"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from vlmtune.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_dataset(out, n_train=24, n_val=8, n_test=8, image_size=56, seed=1)
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a test's vlmtune subprocess: one torch thread per process (the same
    float reductions in every run, and no OpenMP spin on a busy 2-core machine)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


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


def tiny_llava_processor():
    """(LlavaProcessor with a tiny trained tokenizer and 56 px CLIP images, its special token ids):
    the processor of the test-built models that have no vlmtune family."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from vlmtune.models.families.llava import LLAVA_CHAT_TEMPLATE
    from vlmtune.models.tiny import train_tokenizer

    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>")
    tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token = "<unk>", "<s>", "</s>", "<pad>"
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>")
    return proc, {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}


def build_tiny_vipllava(out: Path) -> Path:
    """A tiny VipLLaVA (no vlmtune family: the generic path) saved with its processor in `out`."""
    import torch
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    proc, ids = tiny_llava_processor()
    tok = proc.tokenizer
    cfg = VipLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_index=ids["<image>"], image_seq_length=16, vision_feature_layers=[-2, -1],
    )
    torch.manual_seed(0)
    VipLlavaForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out

"""Step metrics (issue #15 item 4): tokens/s (all and supervised), padding and image-token
fractions and peak memory are logged with every training loss log and saved in metrics.json;
the counts are those of the batches the model saw, and after a resume they cover the whole
run. Length-grouped batches (`training.group_by_length`) pad less and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_config
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.data.collate import IGNORE_INDEX, Encoder
from vlmtune.data.sources import load_split
from vlmtune.models.loading import load_model
from vlmtune.train.sampling import SeededLengthGroupedSampler
from vlmtune.train.throughput import ThroughputMeter, count_batch


def _train(tmp_path, shapes_dir, name: str, **training) -> dict:
    cfg = write_config(tmp_path / f"{name}.yaml", shapes_dir, tmp_path / name, evaluation={"enabled": False},
                       training={"num_train_epochs": 1, "max_steps": -1, "save_strategy": "no", **training})
    assert main(["train", str(cfg)]) == 0
    return json.loads((tmp_path / name / "q__r8" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def expected(shapes_dir, tmp_path_factory):
    """Token counts of one epoch over the training data, from the encoder alone."""
    cfg = load_config(write_config(tmp_path_factory.mktemp("m") / "c.yaml", shapes_dir, tmp_path_factory.mktemp("o")))
    lm = load_model(cfg.models[0], cfg.visual_encoder_settings, "models[0]")
    enc = Encoder(lm.processor, lm.family)
    feats = [enc.encode(s) for s in load_split(cfg, "train")]
    return {"real_tokens": sum(e.n_tokens for e in feats), "image_tokens": sum(e.n_image_tokens for e in feats),
            "supervised": sum(e.n_supervised for e in feats)}


def test_metrics_json_counts_what_the_model_saw(tmp_path, shapes_dir, expected):
    m = _train(tmp_path, shapes_dir, "a", per_device_train_batch_size=4)
    t = m["throughput"]
    for k in ("real_tokens", "image_tokens", "supervised"):
        assert t[k] == expected[k], k
    assert t["tokens"] > t["real_tokens"]  # 24 samples of different lengths in batches of 4: padding
    assert t["padding_fraction"] == pytest.approx(1 - t["real_tokens"] / t["tokens"])
    assert t["image_token_fraction"] == pytest.approx(expected["image_tokens"] / expected["real_tokens"])
    assert t["tokens_per_second"] == pytest.approx(t["real_tokens"] / t["seconds"])
    assert t["supervised_tokens_per_second"] == pytest.approx(t["supervised"] / t["seconds"])
    assert t["peak_memory_gb"] > 0 and "mfu" not in t  # no GPU: no MFU
    # logged with every loss log (logging_steps 1): rates of the run so far
    hist = m["throughput_history"]
    assert [h["step"] for h in hist] == [e["step"] for e in m["train_loss_history"]] == list(range(1, 7))
    assert all(h["tokens_per_second"] > 0 and 0 < h["padding_fraction"] < 1 for h in hist)


def test_rates_after_a_resume_cover_the_whole_run(tmp_path, shapes_dir, expected):
    """Stopped after 4 of 6 steps (a checkpoint at step 4), then extended to the epoch's end:
    the resumed run's counts are the whole epoch's, not only the last two steps'."""
    common = dict(per_device_train_batch_size=4, save_strategy="steps", save_steps=4)
    first = _train(tmp_path, shapes_dir, "r", max_steps=4, **common)["throughput"]
    resumed = _train(tmp_path, shapes_dir, "r", max_steps=6, **common)
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("checkpoint-4")
    t = resumed["throughput"]
    for k in ("real_tokens", "image_tokens", "supervised"):
        assert t[k] == expected[k], k
    assert t["seconds"] > first["seconds"]


def test_group_by_length_pads_less(tmp_path, shapes_dir):
    # 24 samples, batches of 2: transformers' scheme sorts mega-batches of 3 batches by length
    plain = _train(tmp_path, shapes_dir, "p", per_device_train_batch_size=2)["throughput"]
    grouped = _train(tmp_path, shapes_dir, "g", per_device_train_batch_size=2, group_by_length=True)["throughput"]
    assert grouped["real_tokens"] == plain["real_tokens"]  # the same samples, once each
    assert grouped["padding_fraction"] < plain["padding_fraction"]


def test_length_grouped_order_is_a_function_of_seed_and_epoch():
    lengths = [5, 80, 7, 60, 9, 70, 11, 50, 13, 40, 15, 30, 17, 20, 19, 25]
    s = SeededLengthGroupedSampler(lengths, group_size=4, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(16)) and list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(16))
    again = SeededLengthGroupedSampler(lengths, group_size=4, seed=3)
    again.set_epoch(1)
    assert list(again) == list(s)
    # each group of 4 is sorted longest first inside its mega-batch
    assert all(lengths[g[0]] >= lengths[g[-1]] for g in (e0[i:i + 4] for i in range(0, 16, 4)))


def test_count_batch_packed_and_padded():
    ids = torch.tensor([[1, 9, 9, 2, 0, 0], [1, 9, 2, 3, 4, 5]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    labels = torch.where(ids > 1, ids, torch.full_like(ids, IGNORE_INDEX))
    c = {k: int(v) for k, v in count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, image_token_id=9).items()}
    assert c == {"tokens": 12, "real_tokens": 10, "supervised": 8, "image_tokens": 3}
    packed = {k: int(v) for k, v in count_batch({"input_ids": ids.reshape(1, -1), "labels": labels.reshape(1, -1)}, image_token_id=None).items()}
    assert packed["real_tokens"] == packed["tokens"] == 12 and packed["image_tokens"] == 0
    assert count_batch([{"prompt": "x"}], 9) == {"tokens": 0, "real_tokens": 0, "supervised": 0, "image_tokens": 0}


def test_mfu_uses_the_stated_flop_convention(monkeypatch):
    monkeypatch.setenv("VLMTUNE_PEAK_TFLOPS", "1")  # 1e12 FLOP/s
    m = ThroughputMeter(n_params=1000, n_trainable=10)
    m.totals.update(tokens=1e6, real_tokens=1e6, supervised=1e5, seconds=10.0)
    assert m.metrics()["mfu"] == pytest.approx((4 * 1000 + 2 * 10) * 1e6 / 10 / 1e12)


def test_group_by_length_resumes_where_an_uninterrupted_run_ends(tmp_path, shapes_dir):
    # a constant LR: the first run's shorter max_steps changes no update of the steps it trains
    common = dict(per_device_train_batch_size=2, group_by_length=True, save_strategy="steps", save_steps=5, max_steps=12,
                  lr_scheduler_type="constant")
    whole = _train(tmp_path, shapes_dir, "w", **common)
    _train(tmp_path, shapes_dir, "k", **{**common, "max_steps": 5})
    resumed = _train(tmp_path, shapes_dir, "k", **common)
    assert resumed["resumed_from"].endswith("checkpoint-5")
    assert [h["loss"] for h in resumed["train_loss_history"]] == [h["loss"] for h in whole["train_loss_history"]]

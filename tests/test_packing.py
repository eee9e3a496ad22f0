"""Padding-free packing (issue #15, item 1: `training.packing`).

- For every family that packs: the loss and the gradients of one packed row equal those of
  the same samples padded (1e-5 relative, fp32), on every attention form the family packs
  with (sdpa; eager for the explicit masks; Gemma3 with a sliding window shorter than a sample);
- a packed row: no padding, no attention mask, positions restarting per sample, each
  sample's first label ignored, images in sample order, `use_cache=False`;
- a model that cannot pack (no family, a family that cannot, an attention backend that
  cannot) gets one line and trains padded;
- bins hold at most max_length tokens, every sample exactly once, and are a pure function
  of (lengths, max_length, seed);
- generation is unaffected: one packed step and one padded step from the same weights
  generate the same tokens, and the model's config is unchanged;
- `train_run` with `training.packing: true` trains packed rows, and a run interrupted
  mid-training then rerun ends where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from test_families import _samples
from vlmtune.config import load_config
from vlmtune.data.collate import IGNORE_INDEX, Collator, Encoder, SFTDataset
from vlmtune.data.packing import PACKED_ATTENTION_MASK, PackedCollator, PackedDataset, pack_bins, pack_features, packing_blocker
from vlmtune.data.sources import load_split
from vlmtune.eval.generate import GenerationSettings, generate
from vlmtune.models.families import FAMILIES
from vlmtune.models.loading import ModelConfig, load_model
from vlmtune.train.packing import training_data
from vlmtune.train.samples import SAMPLE_INDEX_KEY
from vlmtune.train.sft import train_run

PACKING_FAMILIES = sorted(f for f, fam in FAMILIES.items() if fam.packing and fam.build_tiny is not None)
REL = 1e-5


def _load(fam: str, attn: str | None = None, window: int | None = None):
    """The tiny model of `fam`; `window`: Gemma3's sliding window shortened to that many tokens
    (shorter than a sample, so the sliding layers' masks differ from the full ones)."""
    # Qwen-VL: 112x112 px images -> several merged image tokens each (Qwen3-VL's 32 px merge
    # would make a 56 px image one token, whose M-RoPE position equals its text position)
    lm = load_model(ModelConfig(name=fam, hf_model_id=f"tiny:{fam}", torch_dtype="float32", min_pixels=12544, max_pixels=12544,
                                attn_implementation=attn))
    if window:
        lm.model.config.get_text_config().sliding_window = window
        for m in lm.model.modules():
            if getattr(m, "sliding_window", None):
                m.sliding_window = window
    return lm


def _features(lm, shapes_dir) -> list[dict]:
    """Three samples of different lengths, one of them multi-turn, each with an image."""
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    return [ds[i] for i in range(len(ds))]


def _loss_and_grads(model, batch: dict, n_items: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Summed causal-LM cross-entropy / n_items from the model's full logits, and the grads."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch = dict(batch)
    labels = batch.pop("labels")
    if PACKED_ATTENTION_MASK in batch:
        batch["attention_mask"] = batch.pop(PACKED_ATTENTION_MASK)
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=n_items)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_packed_equals_padded(lm, feats: list[dict]) -> None:
    model = lm.model
    model.eval()  # no dropout (BLIP-2's OPT and Q-Former have some); gradients flow all the same
    n = sum(int((f["labels"] != IGNORE_INDEX).sum()) for f in feats)
    padded_loss, padded = _loss_and_grads(model, Collator(lm.processor.tokenizer.pad_token_id)(feats), n)
    packed_loss, packed = _loss_and_grads(model, pack_features(feats, lm.family, model), n)
    assert abs(packed_loss - padded_loss) <= REL * abs(padded_loss), (packed_loss, padded_loss)
    assert packed.keys() == padded.keys()
    # relative per tensor, skipping tensors whose true gradient is ~0 (e.g. attention k_proj
    # biases: their gradient is 0 in exact arithmetic, so rounding noise is all there is)
    top = max(g.norm().item() for g in padded.values())
    worst = {k: ((packed[k] - g).norm() / g.norm()).item() for k, g in padded.items() if g.norm() > 1e-6 * top}
    assert worst and max(worst.values()) <= REL, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("fam", PACKING_FAMILIES)
def test_packed_row_has_the_loss_and_gradients_of_the_padded_batch(fam, shapes_dir):
    lm = _load(fam)
    assert packing_blocker(lm.family, lm.model) is None
    feats = _features(lm, shapes_dir)
    assert len({f["input_ids"].shape[-1] for f in feats}) > 1  # different lengths
    _assert_packed_equals_padded(lm, feats)
    if fam == "paligemma":  # positions as PaliGemma makes them for one sample: from 1
        pos = pack_features(feats, lm.family, lm.model)["position_ids"][0].tolist()
        assert pos == [p for f in feats for p in range(1, f["input_ids"].shape[-1] + 1)]


@pytest.mark.parametrize("fam,attn,window", [("blip2", "eager", None), ("gemma3", "eager", None), ("gemma3", "sdpa", 8), ("gemma3", "eager", 8)])
def test_explicit_masks_on_every_backend_they_pack_with(fam, attn, window, shapes_dir):
    """Masks the family builds itself: eager adds them to the scores (bool would be wrong
    there), and Gemma3's sliding layers must see a window shorter than a sample."""
    lm = _load(fam, attn, window)
    assert packing_blocker(lm.family, lm.model) is None
    _assert_packed_equals_padded(lm, _features(lm, shapes_dir))


def test_packed_row_layout(shapes_dir):
    lm = _load("qwen2_5_vl")
    feats = _features(lm, shapes_dir)
    feats[1] = {**feats[1], "labels": feats[1]["input_ids"].clone()}  # a sample whose first token is supervised
    lens = [f["input_ids"].shape[-1] for f in feats]
    batch = PackedCollator(lm.family, lm.model, padded=None)([{"packed_samples": feats[:2]}, {"packed_samples": feats[2:]}])
    T = sum(lens)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, T)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert torch.equal(batch["input_ids"][0], torch.cat([f["input_ids"] for f in feats]))
    starts = [0, lens[0], lens[0] + lens[1]]
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()
    assert batch["labels"][0, lens[0] + 1] == feats[1]["input_ids"][1]  # only the first label of a sample
    assert torch.equal(batch["pixel_values"], torch.cat([f["pixel_values"] for f in feats]))  # images in sample order
    assert torch.equal(batch["image_grid_thw"], torch.cat([f["image_grid_thw"] for f in feats]))
    pos = batch["position_ids"]
    assert pos.shape == (4, 1, T)  # text row + M-RoPE (temporal, height, width)
    assert torch.equal(pos[0, 0], torch.cat([torch.arange(n) for n in lens]))
    for f, s, n in zip(feats, starts, lens):  # each sample's rope index as for the sample alone
        alone, _ = lm.model.model.get_rope_index(f["input_ids"][None], f["mm_token_type_ids"][None], image_grid_thw=f["image_grid_thw"])
        assert torch.equal(pos[1:, :, s:s + n], alone)
    # evaluation batches (single samples) are padded
    padded = PackedCollator(lm.family, lm.model, Collator(lm.processor.tokenizer.pad_token_id))(feats)
    assert padded["input_ids"].shape == (3, max(lens)) and "attention_mask" in padded


def test_a_model_that_cannot_pack_gets_one_line_and_trains_padded(shapes_dir, tmp_path, caplog):
    lm = _load("gemma3")
    assert packing_blocker(None, lm.model).startswith("this model has no vlmtune family")
    assert "cannot pack" in packing_blocker(dataclasses.replace(lm.family, packing=None), lm.model)
    blip2 = _load("blip2")
    blip2.model.config.use_decoder_only_language_model = False
    assert "Flan-T5" in packing_blocker(blip2.family, blip2.model)
    # an attention backend that cannot take the family's explicit masks
    lm.model.config.get_text_config()._attn_implementation = "flash_attention_2"
    why = packing_blocker(lm.family, lm.model)
    assert "'flash_attention_2' cannot keep packed gemma3 samples apart" in why
    cfg = load_config(write_config(tmp_path / "cannot.yaml", shapes_dir, tmp_path / "out", training={"packing": True}))
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        train_set, collator, ids, packed = training_data(cfg, lm, ds, "run x")
    lines = [r.getMessage() for r in caplog.records if "packing" in r.getMessage()]
    assert lines == [f"run x: training.packing: {why}; training padded"]
    assert packed is None and len(train_set) == 3 and ids == ["single", "multi", "third"]
    batch = collator([train_set[0], train_set[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].dim() == 2


def test_bins_are_full_exact_and_a_pure_function_of_the_seed():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(5, 60, (200,), generator=g) // 5 * 5).tolist()  # many equal lengths
    bins = pack_bins(lengths, 128, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(200))  # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (128 * len(bins)) > 0.95  # best fit leaves little room
    assert pack_bins(lengths, 128, seed=1) == bins  # deterministic
    assert pack_bins(lengths, 128, seed=2) != bins  # the seed orders equal lengths
    assert pack_bins([128, 1], 128, 0) == [[0], [1]] and pack_bins([], 128, 0) == []
    with pytest.raises(ValueError):
        pack_bins([129], 128, 0)


def test_a_packed_batch_names_its_samples(shapes_dir, tmp_path):
    """The non-finite guard names a batch's samples from its dataset indices: a packed item is
    a bin, named by every sample in it."""
    lm = _load("llava")
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    max_length = max(ds.lengths) + min(ds.lengths)
    packed = PackedDataset(ds, max_length, seed=0)
    assert sorted(len(b) for b in packed.bins) == [1, 2]
    assert packed.lengths == [sum(ds.lengths[i] for i in b) for b in packed.bins]
    assert packed.describe().startswith("3 samples -> 2 rows of <= ")
    cfg = load_config(write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", data={"max_length": max_length}, training={"packing": True}))
    train_set, collator, ids, bins = training_data(cfg, lm, ds, "run x")
    assert bins is not None and len(train_set) == len(ids) == 2
    names = ["single", "multi", "third"]
    assert ids == [", ".join(names[i] for i in b) for b in bins.bins]
    batch = collator([train_set[1], train_set[0]])
    assert batch[SAMPLE_INDEX_KEY].tolist() == [1, 0] and batch["input_ids"].shape == (1, sum(ds.lengths))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "gemma3"])
def test_generation_is_unaffected(fam, shapes_dir):
    """One SGD step on a packed row and one on the same samples padded, from the same weights:
    the same greedy generations, the same model config."""
    lm = _load(fam)
    feats = _features(lm, shapes_dir)
    enc = Encoder(lm.processor, lm.family)
    n = sum(int((f["labels"] != IGNORE_INDEX).sum()) for f in feats)
    config_before = lm.model.config.to_dict()
    out = {}
    for how in ("padded", "packed"):
        model = copy.deepcopy(lm.model)
        model.train()
        batch = Collator(lm.processor.tokenizer.pad_token_id)(feats) if how == "padded" else pack_features(feats, lm.family, model)
        _loss_and_grads(model, batch, n)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        model.eval()
        assert model.config.to_dict() == config_before
        out[how] = [r["prediction"] for r in generate(model, enc, _samples(shapes_dir), 3, GenerationSettings(max_new_tokens=6))]
        out[how + "_params"] = {k: v.detach() for k, v in model.state_dict().items()}
    assert out["packed"] == out["padded"]
    moved = max((out["padded_params"][k] - lm.model.state_dict()[k]).abs().max().item() for k in out["padded_params"])
    diff = max((out["packed_params"][k] - out["padded_params"][k]).abs().max().item() for k in out["padded_params"])
    assert moved > 1e-3 and diff < 1e-4 * moved  # the step did something, and the same thing


class _Crash(Exception):
    pass


def _run(cfg_path: Path, crash_at: int | None = None, seen: list | None = None) -> dict:
    """train_run on the config; `crash_at`: raise during that optimizer step (after its
    checkpoints, before its update); `seen` collects the attention_mask each forward of the
    transformers model receives."""
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if seen is not None:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                base.register_forward_pre_hook(lambda mod, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step + 1 == crash_at:
                raise _Crash()

    cfg = load_config(cfg_path)
    return train_run(cfg, cfg.models[0], cfg.lora_variants[0], load_split(cfg, "train"), None, callbacks=[Hooks()])


def _packed_config(tmp: Path, data: Path, name: str, **training) -> Path:
    # 24 samples of 34-48 tokens in bins of <= 128: 8 rows, 2 per step: 4 steps an epoch;
    # 5 steps cross into the second epoch, LoRA dropout makes the RNG state matter
    t = {"packing": True, "max_steps": 5, "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 1, "seed": 7, **training}
    return write_config(tmp / f"{name}.yaml", data, tmp / name, data={"max_length": 128}, training=t, evaluation={"enabled": False},
                        lora_variants=[{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.1}])


def test_train_run_packs_and_resumes_where_an_uninterrupted_run_ends(shapes_dir, tmp_path, caplog):
    ref_cfg = _packed_config(tmp_path, shapes_dir, "ref")
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        ref = _run(ref_cfg)
    lines = [r.getMessage() for r in caplog.records if "training.packing" in r.getMessage()]
    assert len(lines) == 1 and "24 samples -> 8 rows of <= 128 tokens" in lines[0], lines
    m = ref["metrics"]
    assert m["packed_rows"] == 8 and m["global_step"] == 5 and len(m["train_loss_history"]) == 5

    cfg = _packed_config(tmp_path, shapes_dir, "crash")
    with pytest.raises(_Crash):
        _run(cfg, crash_at=4)
    run = tmp_path / "crash" / "q__r8"
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (run / "metrics.json").exists()
    again = _run(cfg)
    assert again["metrics"]["resumed_from"] == str(run / "checkpoints" / "checkpoint-2")
    a, b = again["metrics"], m
    assert [h["step"] for h in a["train_loss_history"]] == [h["step"] for h in b["train_loss_history"]]
    for x, y in zip(a["train_loss_history"], b["train_loss_history"]):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    w_ref = load_file(str(tmp_path / "ref" / "q__r8" / "lora_adapter" / "adapter_model.safetensors"))
    w = load_file(str(run / "lora_adapter" / "adapter_model.safetensors"))
    assert w.keys() == w_ref.keys() and all(torch.allclose(w[k], w_ref[k], atol=1e-6) for k in w)


def test_train_run_packs_with_an_explicit_mask(shapes_dir, tmp_path):
    """Gemma3's dict of masks goes through the Trainer (its token count stays the real tokens)."""
    cfg = _packed_config(tmp_path, shapes_dir, "g3", max_steps=2, save_steps=2)
    cfg.write_text(cfg.read_text().replace("tiny:qwen2_5_vl", "tiny:gemma3"))
    seen: list = []
    m = _run(cfg, seen=seen)["metrics"]
    assert m["global_step"] == 2 and m["packed_rows"] and all(h["loss"] > 0 for h in m["train_loss_history"])
    assert 0 < m["tokens_seen"] <= 2 * 2 * 128  # 2 steps of 2 rows of <= 128 real tokens, no mask counted
    assert len(seen) == 2 and all(isinstance(a, dict) and set(a) == {"full_attention", "sliding_attention"} for a in seen)


def test_flash_attention_is_chosen_only_where_it_keeps_packed_samples_apart(monkeypatch):
    """The GPU choice (`packing_attention`), with CUDA and flash_attn faked: this machine has
    neither, so the flash run itself is not exercised here."""
    import transformers.utils

    from vlmtune.models.loading import packing_attention

    qwen, gemma = _load("qwen2_5_vl").model.config, _load("gemma3").model.config
    assert packing_attention(qwen, FAMILIES["qwen2_5_vl"], torch.bfloat16) is None  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert packing_attention(qwen, FAMILIES["qwen2_5_vl"], torch.bfloat16) == "flash_attention_2"
    assert packing_attention(qwen, FAMILIES["qwen2_5_vl"], torch.float32) is None  # flash takes half precision only
    assert packing_attention(gemma, FAMILIES["gemma3"], torch.bfloat16) is None  # packs with its own masks
    assert packing_attention(qwen, None, torch.bfloat16) is None
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert packing_attention(qwen, FAMILIES["qwen2_5_vl"], torch.bfloat16) is None

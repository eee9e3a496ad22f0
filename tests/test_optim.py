"""The optimizer as the Trainer really builds and drives it (Reliability II, item 6).

Every test trains through `train/sft.py`'s `train_run` (the code behind `vlmtune train`) on
a tiny Qwen2.5-VL and watches from a `TrainerCallback`, which the Trainer hands its own model,
optimizer and scheduler. Nothing is mocked, and the expectations come from first principles
(module types, the scheduler formulas, a hand-written token-mean cross-entropy), not from
the code under test:

- weight decay hits LoRA matrices and full-trained weights, never biases or norm weights,
  and each part's groups carry learning_rate x its lr_multiplier;
- gradient_accumulation_steps sets the number of optimizer steps, and accumulated
  micro-batches make the same update as one batch: the gradient of the mean cross-entropy
  over every supervised token of the step;
- lr_scheduler_type, warmup_steps and warmup_ratio shape the learning rate of every step.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn
from transformers import TrainerCallback, set_seed

from conftest import write_config
from vlmtune.config import Config, load_config
from vlmtune.data.collate import Collator, Encoder
from vlmtune.data.sources import Sample, load_split
from vlmtune.train.sft import prepare_model, train_run

BASE_LR = 1e-3
MULT = {"vision": 0.1, "projector": 0.5, "llm": 1.0}
PARTS = {"vision": {"lr_multiplier": MULT["vision"]}, "projector": {"lr_multiplier": MULT["projector"]}}
# Fast, and nothing on disk the assertions do not need: no checkpoints, no evaluation.
QUIET = {"save_strategy": "no", "logging_steps": 1}


class Probe(TrainerCallback):
    """Records, from inside `train_run`, what the Trainer's optimizer holds and does."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []  # per optimizer group: lr, weight_decay, parameter names
        self.owner: dict[str, nn.Module] = {}  # parameter name -> the module holding it
        self.step_lrs: list[list[float]] = []  # per optimizer step: the lr of each group for that step
        self.before: dict[str, torch.Tensor] = {}  # trainable tensors before the first step
        self.after: dict[str, torch.Tensor] = {}  # ... and right after it

    def _trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer creates its optimizer (our `create_optimizer`) before this event. Read the
        # model now: after training, train_run merges the LoRA adapters into it.
        self.owner = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"], "names": [names[id(p)] for p in g["params"]]}
                       for g in optimizer.param_groups]
        self.before = self._trainable(model)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # The scheduler steps after each optimizer step, so at the start of step s the groups
        # hold the learning rate step s uses: base x lambda(s - 1).
        self.step_lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.after = self._trainable(model)


def _config(tmp: Path, shapes_dir: Path, training: dict[str, Any], data: Optional[dict[str, Any]] = None) -> Config:
    """conftest's tiny-Qwen2.5-VL config with `training` (and `data`) merged in, loaded as the CLI loads it."""
    over: dict[str, Any] = {"training": {**QUIET, **training}}
    if data:
        over["data"] = data
    return load_config(write_config(tmp / "c.yaml", shapes_dir, tmp / "out", **over))


def _train(cfg: Config, samples: list[Sample]) -> tuple[Probe, dict[str, Any]]:
    """One real `train_run`; returns the probe and the run's metrics.json."""
    probe = Probe()
    result = train_run(cfg, cfg.models[0], cfg.variants()[0], samples, None, callbacks=[probe])
    return probe, json.loads((Path(result["run_dir"]) / "metrics.json").read_text())


def _part(name: str) -> str:
    """A parameter's part from its name, as the README's family table defines Qwen2.5-VL's parts
    (written out here rather than asking the code under test)."""
    if ".visual.merger." in name:
        return "projector"
    if ".visual." in name:
        return "vision"
    assert ".language_model." in name or "lm_head" in name, name
    return "llm"


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the models' own *RMSNorm classes (Qwen2RMSNorm is no nn.RMSNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def _decays(name: str, owner: nn.Module) -> bool:
    """Whether parameter `name` of module `owner` should get weight decay: never biases or norm
    weights; always the weight matrices/kernels of linear (LoRA A/B included), conv and
    embedding layers. Anything else fails loudly, so a new kind of tensor gets a decision."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or _is_norm(owner):
        return False
    if leaf == "weight" and isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
        return True
    raise AssertionError(f"{name} ({type(owner).__name__}): no rule says whether it decays; add one")


# ---------------------------------------------------------------------------------------
# Parameter groups: weight decay and per-part learning rates


@pytest.mark.parametrize("parts", [
    {**PARTS, "vision": {**PARTS["vision"], "train": "full"}},  # vision full (norms, conv, biases), LLM LoRA
    {**PARTS, "vision": {**PARTS["vision"], "train": "lora"}, "llm": {"train": "full"}},  # vision LoRA, LLM full
], ids=["vision_full-llm_lora", "vision_lora-llm_full"])
def test_groups_decay_only_weight_matrices_and_scale_lr_per_part(shapes_dir, tmp_path, parts):
    wd = 0.05
    # constant: the scheduler leaves each group's lr at its configured value
    cfg = _config(tmp_path, shapes_dir, {"training_mode": "both", "parts": parts, "weight_decay": wd, "learning_rate": BASE_LR,
                                         "lr_scheduler_type": "constant", "max_steps": 1, "per_device_train_batch_size": 2})
    probe, _ = _train(cfg, load_split(cfg, "train")[:2])
    owner = probe.owner
    grouped = [n for g in probe.groups for n in g["names"]]
    assert len(grouped) == len(set(grouped)), "a tensor sits in two optimizer groups"
    assert set(grouped) == set(probe.before), "optimizer groups != trainable tensors"

    seen = {"bias": 0, "norm": 0, "lora": 0, "full matrix": 0}
    for g in probe.groups:
        for name in g["names"]:
            decay = _decays(name, owner[name])
            assert g["weight_decay"] == (wd if decay else 0.0), f"{name}: weight_decay {g['weight_decay']}"
            assert g["lr"] == pytest.approx(BASE_LR * MULT[_part(name)], rel=1e-12), f"{name}: lr {g['lr']}"
            kind = ("bias" if name.endswith(".bias") else "norm" if _is_norm(owner[name])
                    else "lora" if ".lora_" in name else "full matrix")
            seen[kind] += 1
    # every kind of tensor the rule distinguishes is really in this run
    assert all(seen.values()), seen


# ---------------------------------------------------------------------------------------
# Gradient accumulation: number of optimizer steps, and the update of one step


def _steps_per_transformers(n: int, batch: int, accum: int, epochs: int) -> int:
    """transformers: an epoch has ceil(n / batch) micro-batches, and an optimizer step every
    `accum` of them plus one for a partial remainder."""
    micro = math.ceil(n / batch)
    return epochs * (micro // accum + int(micro % accum > 0))


# 3 steps, not 5 (the last one from a partial accumulation); 2 epochs of 2 micro-batches, each
# epoch one step although it is shorter than an accumulation: 2 steps, not 4
@pytest.mark.parametrize("n, batch, accum, epochs", [(10, 2, 2, 1), (4, 2, 3, 2)])
def test_accumulation_sets_the_number_of_optimizer_steps(shapes_dir, tmp_path, n, batch, accum, epochs):
    cfg = _config(tmp_path, shapes_dir, {"max_steps": -1, "num_train_epochs": epochs, "per_device_train_batch_size": batch,
                                         "gradient_accumulation_steps": accum})
    probe, metrics = _train(cfg, load_split(cfg, "train")[:n])
    want = _steps_per_transformers(n, batch, accum, epochs)
    assert want < math.ceil(n / batch) * epochs  # the case tells accumulation from none
    assert metrics["global_step"] == want
    assert len(probe.step_lrs) == want and [h["step"] for h in metrics["train_loss_history"]] == list(range(1, want + 1))


# Answers of very different token lengths: a micro-batch's own mean weights each of its tokens
# unlike the step's mean over all its tokens, unless every micro-batch has as many.
UNEQUAL = [("images/train_0000.png", "What color is the shape?", "red"),
           ("images/train_0001.png", "Which shape is shown?", "a green square"),
           ("images/train_0002.png", "What color is the shape?", "the shape is blue and round, a circle on grey noise"),
           ("images/train_0003.png", "Describe it.", "yellow triangle in the middle")]
# Plain SGD (update = -lr x gradient, exactly), no clipping, no decay, constant lr 1 in every
# part (the vision encoder's default multiplier is 0.1): the update after one step *is* the
# gradient the Trainer built, and lr 1 keeps it well above the float32 rounding of the weights.
SGD = {"optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant", "max_grad_norm": 0, "weight_decay": 0,
       "max_steps": -1, "num_train_epochs": 1, "training_mode": "both", "parts": {"vision": {"lr_multiplier": 1.0}}}


@dataclass
class Reference:
    """What one step over 4 samples should do, computed by hand (`_reference`)."""

    grads: dict[str, torch.Tensor]  # trainable tensor name -> gradient of the step's loss
    tokens: list[int]  # supervised tokens per sample


@pytest.fixture(scope="module")
def one_step(shapes_dir, tmp_path_factory) -> Callable[[str, int, int], tuple[Probe, dict[str, Any], Reference]]:
    """`one_step(data, batch, accum)`: one epoch over 4 samples ("equal": 4 synthetic samples,
    2 supervised tokens each; "unequal": `UNEQUAL`) -> (probe, metrics.json, reference).
    All 4 samples fall into the one optimizer step, so the reference does not depend on the
    order the sampler chose. Runs and references are cached: several tests read the same ones."""
    root = tmp_path_factory.mktemp("one_step")
    with open(root / "unequal.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("url", "instruction", "response"), *UNEQUAL])
    data = {"equal": None, "unequal": {"train_csv": str(root / "unequal.csv"), "image_root": str(shapes_dir)}}
    cache: dict[Any, Any] = {}

    def get(which: str, batch: int, accum: int):
        tmp = root / f"{which}-{batch}x{accum}"
        tmp.mkdir(exist_ok=True)
        cfg = _config(tmp, shapes_dir, {**SGD, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum}, data[which])
        samples = load_split(cfg, "train")[:4]
        if (which, batch, accum) not in cache:
            cache[(which, batch, accum)] = _train(cfg, samples)
        probe, metrics = cache[(which, batch, accum)]
        if which not in cache:
            cache[which] = _reference(cfg, samples, probe.before)
        return probe, metrics, cache[which]

    return get


def _reference(cfg: Config, samples: list[Sample], init: dict[str, torch.Tensor]) -> Reference:
    """The gradient of the mean cross-entropy over every supervised (label != -100) next-token
    prediction of `samples`, in one batch, written out by hand, at the run's initial weights."""
    set_seed(cfg.training.seed)  # as train_run: the same LoRA init
    lm, model, _ = prepare_model(cfg, cfg.models[0], cfg.variants()[0], "model")
    params = dict(model.named_parameters())
    assert set(init) == {n for n, p in params.items() if p.requires_grad}
    assert all(torch.equal(params[n], init[n]) for n in init), "the reference model does not start where the run started"
    enc = Encoder(lm.processor, lm.family)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([enc.encode(s).features for s in samples])
    labels = batch.pop("labels")
    model.train()  # as the Trainer (dropout is 0 in the tiny models and the LoRA variant)
    logits = model(**batch).logits
    # position t predicts token t+1
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    loss = nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels != -100).sum()
    loss.backward()
    return Reference(grads={n: params[n].grad.detach().clone() for n in init},
                     tokens=[int((enc.encode(s).features["labels"] != -100).sum()) for s in samples])


def _assert_update_is(probe: Probe, ref: Reference, lr: float = 1.0) -> None:
    """The first SGD step moved every trainable tensor by -lr x the reference gradient (to
    float32 rounding)."""
    assert probe.after, "no optimizer step was taken"
    moved = set()
    for name, g in ref.grads.items():
        update = (probe.before[name] - probe.after[name]) / lr
        scale = float(g.abs().max())
        err = float((update - g).abs().max())
        assert err <= 1e-4 * scale + 1e-7, f"{name}: update differs from the gradient by {err:.3g} (gradient max {scale:.3g})"
        if scale > 0:
            moved.add(_part(name))
    assert moved == {"vision", "projector", "llm"}, moved  # the comparison is not vacuous


def test_one_batch_update_is_the_gradient_of_the_token_mean_loss(one_step):
    probe, metrics, ref = one_step("unequal", 4, 1)
    # The answers' lengths differ, and so do the halves of any split into 2 + 2 micro-batches
    # (the premise of the next-but-one test, checked here where no xfail can hide it).
    c = ref.tokens
    assert len(set(c)) == 4 and c[0] + c[1] != c[2] + c[3] and c[0] + c[2] != c[1] + c[3] and c[0] + c[3] != c[1] + c[2], c
    assert metrics["global_step"] == 1
    _assert_update_is(probe, ref)


def test_accumulated_micro_batches_make_the_update_of_one_batch(one_step):
    # 2 micro-batches of 2 over the 4 samples: one optimizer step with the gradient of one
    # batch of 4. Every sample has as many supervised tokens, so this holds however the
    # Trainer weights its micro-batches, as long as it averages them (see the next test).
    probe, metrics, ref = one_step("equal", 2, 2)
    assert len(set(ref.tokens)) == 1
    assert metrics["global_step"] == 1 and len(probe.step_lrs) == 1
    _assert_update_is(probe, ref)


# transformers sets accepts_loss_kwargs = False on Qwen2_5_VLForConditionalGeneration: without
# train/loss.py each micro-batch was its own token mean, weighting tokens unequally.
def test_accumulation_normalises_over_all_supervised_tokens_of_the_step(one_step):
    # Any split of these 4 samples into 2 + 2 gives micro-batches with different token counts
    # (checked in the one-batch test): weighting each micro-batch's mean alike is wrong here.
    probe, metrics, ref = one_step("unequal", 2, 2)
    assert metrics["global_step"] == 1
    _assert_update_is(probe, ref)


# ---------------------------------------------------------------------------------------
# Learning-rate schedule


def _linear(i: int, warmup: int, total: int) -> float:
    """Linear warmup 0 -> 1 over `warmup` steps, then linear decay to 0 at `total`."""
    return i / warmup if i < warmup else max(0.0, (total - i) / max(1, total - warmup))


def _cosine(i: int, warmup: int, total: int) -> float:
    """Linear warmup, then half a cosine from 1 to 0 at `total`."""
    if i < warmup:
        return i / warmup
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, total - warmup))))


def _constant(i: int, warmup: int, total: int) -> float:
    return 1.0


def _assert_schedule(probe: Probe, metrics: dict[str, Any], factor: Callable[[int], float], total: int) -> None:
    """Step s (1-based) of every group ran at its base lr x factor(s - 1), and metrics.json logs
    that lr of the first group for step s (transformers 5 logs the lr the step used)."""
    bases = [BASE_LR * MULT[_part(g["names"][0])] for g in probe.groups]
    assert len(probe.step_lrs) == total
    for s, lrs in enumerate(probe.step_lrs, start=1):
        assert lrs == pytest.approx([b * factor(s - 1) for b in bases], rel=1e-9, abs=1e-15), f"step {s}"
    logged = metrics["train_loss_history"]
    assert [h["step"] for h in logged] == list(range(1, total + 1))
    assert [h["learning_rate"] for h in logged] == pytest.approx([bases[0] * factor(s - 1) for s in range(1, total + 1)], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("kind, formula, warmup", [("linear", _linear, 2), ("cosine", _cosine, 2), ("constant", _constant, 0)])
def test_scheduler_shapes_the_learning_rate_of_every_step(shapes_dir, tmp_path, kind, formula, warmup):
    total = 5
    cfg = _config(tmp_path, shapes_dir, {"lr_scheduler_type": kind, "warmup_steps": warmup, "max_steps": total, "learning_rate": BASE_LR,
                                         "parts": PARTS, "per_device_train_batch_size": 1})
    probe, metrics = _train(cfg, load_split(cfg, "train")[:total])
    assert {_part(n) for g in probe.groups for n in g["names"]} == {"projector", "llm"}  # two multipliers, both scheduled
    _assert_schedule(probe, metrics, lambda i: formula(i, warmup, total), total)


@pytest.mark.parametrize("training, n, total, warmup", [
    ({"max_steps": 4, "warmup_ratio": 0.3}, 4, 4, 2),  # ceil(0.3 x 4)
    ({"max_steps": 4, "warmup_ratio": 0.25, "warmup_steps": 3}, 4, 4, 3),  # warmup_steps wins over the ratio
    # a ratio of the optimizer steps the epochs make (5 micro-batches of 2 -> 3 steps), not of
    # the samples or micro-batches: ceil(0.5 x 3) = 2
    ({"max_steps": -1, "num_train_epochs": 1, "warmup_ratio": 0.5, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, 10, 3, 2),
    ({"max_steps": 3, "warmup_ratio": 1.0}, 3, 3, 3),  # the whole run warms up
], ids=["ratio", "steps_win", "ratio_of_epochs", "ratio_1"])
def test_warmup_ratio_becomes_that_share_of_the_steps(shapes_dir, tmp_path, training, n, total, warmup):
    cfg = _config(tmp_path, shapes_dir, {"lr_scheduler_type": "linear", "learning_rate": BASE_LR, "parts": PARTS,
                                         "per_device_train_batch_size": 1, **training})
    probe, metrics = _train(cfg, load_split(cfg, "train")[:n])
    assert metrics["global_step"] == total
    _assert_schedule(probe, metrics, lambda i: _linear(i, warmup, total), total)

"""GRPO (`vlmtune grpo`): TRL's GRPOTrainer with vlmtune's parts, mixins and run directory,
on a tiny Qwen2.5-VL on CPU.

- the three start-up lines, and a reference that stays bit-identical (LoRA: the base under
  disable_adapter; full training: TRL's copy, frozen), with the policy's frozen parts too;
- beta 0 builds no reference;
- a user reward given by path is called with (completions, references, samples); a reward
  that raises or returns the wrong length is one line naming it and the sample;
- the advantages the trainer uses equal a hand-computed group of 4;
- a reference that is not frozen stops the run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_config

RUN = "q__r8"


def _config(tmp: Path, data: Path, grpo: dict, training: dict | None = None) -> Path:
    t = {"max_steps": 2, "logging_steps": 1, "learning_rate": "1e-3", "save_steps": 2, "seed": 3, **(training or {})}
    g = {"num_generations": 4, "prompts_per_step": 1, "max_completion_length": 4, **grpo}
    return write_config(tmp / "c.yaml", data, tmp / "out", training=t, evaluation={"enabled": False},
                        lora_variants=[{"name": "r8", "r": 8, "alpha": 16, "dropout": 0.0}], grpo=g)


def _cli(cfg: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmtune", "grpo", str(cfg), *extra], capture_output=True, text=True, env=e, timeout=600)


def _in_process(cfg_path: Path, trainer_hook=None, callbacks=None):
    """grpo_run in this process (so tests can look inside the trainer)."""
    from vlmtune.config import load_config
    from vlmtune.data.check import gate
    from vlmtune.train import grpo as G

    cfg = load_config(cfg_path)
    splits, _ = gate(cfg)
    if trainer_hook is not None:
        original = G._grpo_trainer_cls
        G._grpo_trainer_cls = lambda: trainer_hook(original())
    try:
        return G.grpo_run(cfg, cfg.models[0], cfg.variants()[0], splits["train"], splits["val"], callbacks=callbacks)
    finally:
        if trainer_hook is not None:
            G._grpo_trainer_cls = original


class _Snapshot:
    """A TrainerCallback that snapshots the reference and the frozen policy parameters at the
    start of training and compares them at the end."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.trainer = None
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.before = {n: p.detach().clone() for n, p in outer.watched(model)}

            def on_train_end(self, args, state, control, model=None, **kw):
                outer.after = {n: p.detach().clone() for n, p in outer.watched(model)}

        self.callback = CB()

    def watched(self, model):
        from vlmtune.train.reference import reference_parameters

        kind, ref = reference_parameters(self.trainer)
        frozen = [(f"policy:{n}", p) for n, p in model.named_parameters() if not p.requires_grad]
        return [(f"ref:{n}", p) for n, p in ref] + frozen


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_and_frozen_parts_stay_bit_identical(shapes_dir, tmp_path, mode):
    training = {"training_mode": "projector"} if mode == "full" else {}
    cfg = _config(tmp_path, shapes_dir, {"beta": 0.1, "rewards": [{"name": "length_penalty", "max_words": 1}]}, training)
    snap = _Snapshot()

    def hook(cls):
        class Watched(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                snap.trainer = self
        return Watched

    res = _in_process(cfg, hook, [snap.callback])
    kind = "copy" if mode == "full" else "adapter-disabled"
    from vlmtune.train.reference import reference_parameters

    assert reference_parameters(snap.trainer)[0] == kind
    assert snap.before and set(snap.before) == set(snap.after)
    refs = [n for n in snap.before if n.startswith("ref:")]
    assert refs, "no reference parameters watched"
    for n in snap.before:
        assert torch.equal(snap.before[n], snap.after[n]), n
    assert res["metrics"]["global_step"] == 2 and res["metrics"]["method"] == "grpo"


def test_startup_lines_beta_zero_and_a_user_reward_by_path(shapes_dir, tmp_path):
    mod = tmp_path / "my_rewards.py"
    log = tmp_path / "calls.jsonl"
    mod.write_text(
        "import json\n"
        "def brevity(completions, references, samples):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'completions': completions, 'references': references, 'ids': [s.id for s in samples],\n"
        "                            'responses': [s.response for s in samples]}) + '\\n')\n"
        "    return [-len(c) / 10 for c in completions]\n")
    cfg = _config(tmp_path, shapes_dir, {"rewards": [{"function": "my_rewards:brevity", "weight": 0.5}, {"name": "exact_match"}], "probe_samples": 2},
                  {"eval_steps": 1})
    r = _cli(cfg, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("INFO: ")]
    assert lines[:3] == ["INFO: VLM Policy parameters: 394,304", "INFO: Reference policy parameters: 377,920 (adapter-disabled)",
                         "INFO: Reference policy properly frozen"], lines
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # one generation batch per step, and the visual-reliance probe (2 samples, with and without
    # their images) after each step
    probe_calls = [c for c in calls if len(c["completions"]) == 2]
    calls = [c for c in calls if len(c["completions"]) != 2]
    assert len(calls) == 2 and len(probe_calls) == 4
    for c in calls:
        assert len(c["completions"]) == len(c["references"]) == len(c["ids"]) == 4  # one prompt x 4 generations
        assert all(isinstance(x, str) for x in c["completions"]) and len(set(c["ids"])) == 1
        assert c["references"] == c["responses"] and c["ids"][0].startswith("train.csv:")
    m = json.loads((tmp_path / "out" / RUN / "metrics.json").read_text())
    assert [h["step"] for h in m["grpo_history"]] == [1, 2] and "rewards/brevity/mean" in m["grpo_history"][0]
    vr = m["visual_reliance_history"]
    assert [h["step"] for h in vr] == [1, 2]
    for h in vr:  # the gap is the reward with the real images minus the reward with them blanked
        assert abs(h["visual_reliance/gap"] - (h["visual_reliance/reward_with_image"] - h["visual_reliance/reward_blank_image"])) < 1e-9
    for rel in ("final/model.safetensors", "lora_adapter/adapter_model.safetensors", "config.yaml", "parameter_report.json"):
        assert (tmp_path / "out" / RUN / rel).is_file(), rel
    # beta 0: no reference at all
    r0 = _cli(cfg, "--set", "grpo.beta=0", "--set", "output_dir=" + str(tmp_path / "out0"), env={"PYTHONPATH": str(tmp_path)})
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert "INFO: beta = 0: no reference policy is built" in r0.stderr and "Reference policy parameters" not in r0.stderr


@pytest.mark.parametrize("body, says", [
    ("    raise ValueError('boom')\n", "grpo reward bad: raised ValueError: boom on samples train.csv:"),
    ("    return [1.0]\n", "grpo reward bad: returned 1 values for 4 completions"),
    ("    return ['x'] * len(completions)\n", "grpo reward bad: returned 'x' for sample train.csv:"),
])
def test_a_broken_reward_is_one_line_naming_it(shapes_dir, tmp_path, body, says):
    (tmp_path / "broken.py").write_text("def bad(completions, references, samples):\n" + body)
    cfg = _config(tmp_path, shapes_dir, {"rewards": [{"function": "broken:bad"}]})
    r = _cli(cfg, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: " + says), last
    assert "Traceback" not in r.stderr


def test_advantages_match_a_hand_computed_group(shapes_dir, tmp_path):
    """One prompt, 4 completions rewarded 3, 1, 0, 0 (by position): the group mean is 1 and
    its sample std sqrt(((2)^2 + 0 + 1 + 1) / 3) = sqrt(2), so the advantages are
    (2, 0, -1, -1) / (sqrt(2) + 1e-4) -- TRL's scale_rewards: group (docs/grpo.md)."""
    (tmp_path / "fixed.py").write_text("def by_position(completions, references, samples):\n    return [3.0, 1.0, 0.0, 0.0][:len(completions)]\n")
    sys.path.insert(0, str(tmp_path))
    seen: list[torch.Tensor] = []

    def hook(cls):
        class Recording(cls):
            def compute_loss(self, model, inputs, *a, **k):
                seen.append(inputs["advantages"].detach().clone())
                return super().compute_loss(model, inputs, *a, **k)
        return Recording

    try:
        cfg = _config(tmp_path, shapes_dir, {"rewards": [{"function": "fixed:by_position"}], "beta": 0.0}, {"max_steps": 1})
        _in_process(cfg, hook)
    finally:
        sys.path.remove(str(tmp_path))
    s = math.sqrt(2.0) + 1e-4
    want = torch.tensor([2 / s, 0.0, -1 / s, -1 / s])
    # TRL shuffles the generation batch after scoring it: compare the group as a multiset
    assert seen and torch.allclose(seen[0].flatten().sort().values, want.sort().values, atol=1e-5), seen[0]


def test_a_reference_that_is_not_frozen_stops_the_run():
    """The frozen claim is checked: a base weight that requires grad (and sits in the
    optimizer) under the adapter-disabled reference is refused with a clear line."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.train.reference import ReferenceNotFrozen, check_reference_frozen

    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
    trainer = SimpleNamespace(beta=0.04, ref_model=None, model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    frozen_ok = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    check_reference_frozen(trainer, frozen_ok)  # as built: fine
    leaked = next(p for n, p in model.named_parameters() if "base_layer.weight" in n)
    leaked.requires_grad_(True)  # deliberately unfrozen
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ReferenceNotFrozen) as e:
        check_reference_frozen(trainer, opt)
    line = e.value.line()
    assert line.startswith("grpo reference policy: not frozen: 1 parameter(s) require grad") and "1 are in the optimizer" in line


def test_grpo_raises_held_out_exact_match_on_the_demo_task(tmp_path):
    """Acceptance: the demo's SFT stopped early (examples/sft_early.yaml, held-out exact
    match in [0.2, 0.7]), then GRPO with the exact_match reward (examples/grpo_demo.yaml):
    held-out exact match goes up, and so does the mean reward from the first fifth of the
    steps to the last. Both example files run as they are, only their paths redirected."""
    from vlmtune.data.synthetic import make_dataset
    from vlmtune.demo import IMAGE_SIZE

    root = Path(__file__).resolve().parents[1] / "examples"
    data = tmp_path / "data"
    make_dataset(data, image_size=IMAGE_SIZE, seed=0, kinds=("color",))  # the demo's data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = ["--set", f"data.train_csv={data / 'train.csv'}", "--set", f"data.test_csv={data / 'test.csv'}"]
    sft = subprocess.run([sys.executable, "-m", "vlmtune", "train", str(root / "sft_early.yaml"), *paths, "--set", f"output_dir={tmp_path / 'sft'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    sft_run = tmp_path / "sft" / "tiny_qwen2_5_vl__lora_r32"
    before = json.loads((sft_run / "generation_metrics.json").read_text())["exact_match"]["value"]
    assert 0.2 <= before <= 0.7, before
    r = subprocess.run([sys.executable, "-m", "vlmtune", "grpo", str(root / "grpo_demo.yaml"), *paths, "--set", f"output_dir={tmp_path / 'grpo'}",
                        "--set", f"grpo.init_from={sft_run}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "grpo" / "tiny_qwen2_5_vl__r16"
    after = json.loads((run / "generation_metrics.json").read_text())["exact_match"]["value"]
    rewards = [h["reward"] for h in json.loads((run / "metrics.json").read_text())["grpo_history"]]
    fifth = len(rewards) // 5
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    assert after > before, (before, after)
    assert last > first, (first, last)
    # evaluate --run --weights adapter: the adapter goes onto the SFT run's merged weights it
    # was trained on (not the configured base model), giving exactly final/'s weights
    from vlmtune.eval.standalone import load_run

    via_adapter = dict(load_run(run, "adapter").model.named_parameters())
    for n, p in load_run(run, "final").model.named_parameters():
        assert torch.allclose(p, via_adapter[n], atol=1e-5), n


def test_the_probe_blanks_every_image_at_its_size(shapes_dir, tmp_path):
    from PIL import Image

    from vlmtune.data.sources import Sample
    from vlmtune.eval.probe import _blanked

    imgs = sorted(str(p) for p in (shapes_dir / "images").glob("*.png"))[:2]
    s = Sample("a:1", [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], imgs)
    (b,) = _blanked([s], tmp_path)
    assert len(b.images) == 2 and b.messages == s.messages and b.id == s.id
    for orig, blank in zip(imgs, b.images):
        im = Image.open(blank)
        assert im.size == Image.open(orig).size and im.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_a_deliberately_unfrozen_reference_stops_a_real_run(shapes_dir, tmp_path):
    """End to end: a base weight (part of the adapter-disabled reference) made trainable after
    the trainer is built lands in the optimizer; the check before step 1 stops the run and
    nothing is trained."""
    from vlmtune.train.reference import ReferenceNotFrozen

    def hook(cls):
        class Leaky(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                base = next(p for n, p in self.model.named_parameters() if "base_layer.weight" in n)
                base.requires_grad_(True)
        return Leaky

    cfg = _config(tmp_path, shapes_dir, {"rewards": [{"name": "exact_match"}]})
    with pytest.raises(ReferenceNotFrozen, match=r"not frozen: 1 parameter\(s\) require grad .* 1 are in the optimizer"):
        _in_process(cfg, hook)
    assert not (tmp_path / "out" / RUN / "metrics.json").exists() and not list((tmp_path / "out" / RUN / "checkpoints").glob("checkpoint-*"))


def test_grpo_without_a_grpo_section_is_one_line(shapes_dir, tmp_path, capsys):
    from vlmtune.cli import main

    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out")
    assert main(["grpo", str(cfg)]) == 1
    assert "the config has no grpo: section" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_reward_that_does_not_import_fails_before_the_model_loads(shapes_dir, tmp_path):
    cfg = _config(tmp_path, shapes_dir, {"rewards": [{"function": "no_such_module_here:f"}]})
    r = _cli(cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: grpo.rewards[0].function: cannot import 'no_such_module_here'"), last
    assert "(GRPO):" not in r.stderr and not (tmp_path / "out").exists()  # no model loaded (its part report), nothing written

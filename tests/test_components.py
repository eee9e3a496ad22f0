"""What trains: frozen parts stay bit-identical, trained parts change, LoRA stays inside its
part, and every part's optimizer group has its configured learning rate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtune.config import LoraConfig, ModelConfig, PartConfig, TrainingConfig, VisualEncoderSettings
from vlmtune.data.collate import Collator, Encoder
from vlmtune.data.sources import Sample
from vlmtune.errors import UserError
from vlmtune.models.loading import load_model
from vlmtune.train.adapt import apply_plan, strip_peft
from vlmtune.train.optim import param_groups
from vlmtune.train.plan import plan_parts

IMG = Image.new("RGB", (56, 56), (30, 200, 30))
SAMPLE = Sample("s", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "green"}]}])
LORA = LoraConfig(name="t", r=4, alpha=8, dropout=0.0)
EXPECT = {  # mode -> parts that must change
    "projector": {"projector"},
    "llm": {"projector", "llm"},
    "vision": {"projector", "vision"},
    "both": {"projector", "llm", "vision"},
}


def _step(family: str, training: TrainingConfig, ve=None):
    lm = load_model(ModelConfig(name="m", hf_model_id=f"tiny:{family}", min_pixels=3136, max_pixels=3136))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    plan = plan_parts(training, ve or VisualEncoderSettings())
    model = apply_plan(lm.model, lm.parts, lm.family, plan, LORA)
    groups = param_groups(model, lm.parts, plan, 1e-2, 0.0)
    opt = torch.optim.AdamW(groups)
    enc = Encoder(lm.processor, lm.family)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([enc.encode(SAMPLE, [IMG]).features] * 2)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    model.lora_names = {strip_peft(n).split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    after = {n: p.detach() for n, p in merged.named_parameters()}
    changed = {lm.parts.part_of(n) for n in before if not torch.equal(before[n], after[n])}
    return lm, model, plan, groups, changed, before, after


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("mode", list(EXPECT))
def test_each_mode_trains_exactly_its_parts(family, mode):
    lm, model, plan, groups, changed, before, after = _step(family, TrainingConfig(training_mode=mode))
    assert changed == EXPECT[mode]
    for n in before:  # frozen parts bit-identical
        if lm.parts.part_of(n) not in EXPECT[mode]:
            assert torch.equal(before[n], after[n]), n
    # No LoRA module inside a frozen part.
    for name in model.lora_names:
        assert plan[lm.parts.part_of(name)].train == "lora", name


def test_llm_lora_never_wraps_vision_modules_with_the_same_leaf_names():
    # Qwen2.5-VL's vision MLP has gate_proj/up_proj/down_proj too: a plain name list would wrap them.
    lm, model, *_ = _step("qwen2_5_vl", TrainingConfig(training_mode="llm"))
    wrapped = model.lora_names
    assert wrapped and all(w.startswith("model.language_model.") for w in wrapped)
    assert any(w.endswith("down_proj") for w in wrapped)


def test_full_parts_and_lr_multipliers_become_param_groups():
    t = TrainingConfig(training_mode="both", parts={"llm": PartConfig(train="full", lr_multiplier=0.5)})
    ve = VisualEncoderSettings(visual_learning_rate_multiplier=0.01)
    lm, model, plan, groups, changed, before, after = _step("qwen2_5_vl", t, ve)
    lrs = {g["part"]: g["lr"] for g in groups}
    assert lrs == {"vision": pytest.approx(1e-4), "projector": pytest.approx(1e-2), "llm": pytest.approx(5e-3)}
    assert changed == {"vision", "projector", "llm"}
    # Full LLM: every LLM weight trains (not just LoRA'd ones); decay groups exclude 1-D tensors.
    assert all(not torch.equal(before[n], after[n]) for n in before if n.startswith("model.language_model.layers.0.mlp"))


def test_freeze_visual_encoder_and_bad_targets():
    plan = plan_parts(TrainingConfig(training_mode="both"), VisualEncoderSettings(freeze_visual_encoder=True))
    assert (plan["vision"].train, plan["llm"].train) == ("frozen", "lora")
    lm = load_model(ModelConfig(name="m", hf_model_id="tiny:qwen2_5_vl"))
    with pytest.raises(UserError, match="'qkv_proj' matches no linear module in the vision.*qkv"):
        apply_plan(lm.model, lm.parts, lm.family, plan_parts(TrainingConfig(training_mode="vision"), VisualEncoderSettings()),
                   LoraConfig(r=4, alpha=8, dropout=0.0, vision_target_modules=["qkv_proj"]))
    with pytest.raises(UserError, match="projector trains in every mode"):
        plan_parts(TrainingConfig(parts={"projector": PartConfig(train="frozen")}), VisualEncoderSettings())

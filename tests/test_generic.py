"""The generic path: a model no family describes has its parts found by inspection.

VipLLaVA (not a vlmtune family) is built tiny and saved like a hub checkpoint: its parts are
found from the module structure, `vlmtune inspect` shows them, and it trains per part.
Fuyu has no separate vision encoder: it is "unresolved", trains only in `both` mode, and the
other modes say why.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_vipllava
from vlmtune.cli import main
from vlmtune.config import LoraConfig, ModelConfig, PartConfig, TrainingConfig, VisualEncoderSettings
from vlmtune.data.collate import Collator, Encoder, SFTDataset
from vlmtune.data.sources import Sample
from vlmtune.errors import UserError
from vlmtune.models.loading import load_model
from vlmtune.train.adapt import apply_plan
from vlmtune.train.plan import plan_parts


@pytest.fixture(scope="module")
def vipllava_dir(tmp_path_factory):
    return build_tiny_vipllava(tmp_path_factory.mktemp("vipllava"))


@pytest.fixture(scope="module")
def fuyu_dir(tmp_path_factory):
    from transformers import FuyuConfig, FuyuForCausalLM

    cfg = FuyuConfig(image_size=56, patch_size=14, text_config=dict(
        model_type="persimmon", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    out = tmp_path_factory.mktemp("fuyu")
    FuyuForCausalLM(cfg).save_pretrained(out)
    return out


def test_inspection_finds_the_three_parts(vipllava_dir, capsys):
    lm = load_model(ModelConfig(name="v", hf_model_id=str(vipllava_dir), torch_dtype="float32"))
    assert lm.family is None and lm.parts.found_by == "inspection" and not lm.parts.unresolved
    assert lm.parts.roots["vision"] == ["model.vision_tower"]
    assert lm.parts.roots["projector"] == ["model.multi_modal_projector"]
    assert lm.parts.roots["llm"] == ["model.language_model", "lm_head"]
    assert main(["inspect", str(vipllava_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "generic" and info["found_by"] == "inspection"
    parts = info["report"]["parts"]
    assert all(parts[p]["total"] > 0 for p in ("vision", "projector", "llm"))
    assert sum(v["total"] for v in parts.values()) == info["report"]["total_parameters"] and parts["other"]["total"] == 0


@pytest.mark.parametrize("mode, trained", [("projector", {"projector"}), ("llm", {"projector", "llm"}), ("vision", {"projector", "vision"})])
def test_generic_model_trains_per_part(vipllava_dir, shapes_dir, mode, trained):
    lm = load_model(ModelConfig(name="v", hf_model_id=str(vipllava_dir), torch_dtype="float32"))
    plan = plan_parts(TrainingConfig(training_mode=mode), VisualEncoderSettings())
    model = apply_plan(lm.model, lm.parts, None, plan, LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
    img = str(sorted((shapes_dir / "images").glob("*.png"))[0])
    s = Sample("x", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], [img])
    enc = Encoder(lm.processor, None)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([SFTDataset([s], enc, 512)[0]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    opt.step()
    changed = set()
    for n, p in model.named_parameters():
        part = lm.parts.part_of(n.replace("base_model.model.", "", 1).replace(".base_layer", "").replace("modules_to_save.default.", "").replace("original_module.", ""))
        if not torch.equal(p.detach(), before[n]):
            changed.add(part)
    assert changed == trained


def test_model_without_separate_encoder_trains_only_whole(fuyu_dir, caplog):
    from vlmtune.models.families import resolve_parts
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(fuyu_dir))
    parts = resolve_parts(model, None)
    assert "no separate vision encoder" in parts.unresolved
    for mode in ("projector", "llm", "vision"):
        with pytest.raises(UserError) as e:
            apply_plan(model, parts, None, plan_parts(TrainingConfig(training_mode=mode), VisualEncoderSettings()), LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
        assert "no separate vision encoder" in e.value.line() and "training_mode: both" in e.value.line()
    both = plan_parts(TrainingConfig(training_mode="both"), VisualEncoderSettings())
    pm = apply_plan(model, parts, None, both, LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
    lora = {n for n, _ in pm.named_modules() if n.endswith("lora_A")}
    # LoRA everywhere: the patch embedding that stands in for an encoder and the LLM alike
    assert any("vision_embed_tokens" in n for n in lora) and any("language_model" in n for n in lora)
    assert "training the whole model" in caplog.text

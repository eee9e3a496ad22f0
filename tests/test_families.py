"""Every registered family, through the code users run (Model families issue, acceptance):

- `vlmtune inspect tiny:<family>` finds the three parts, each non-empty, summing to the total;
- `vlmtune preview` supervises exactly answer + end-of-turn, single- and multi-turn;
- one optimizer step in every mode with LoRA and with full training leaves frozen parts
  bit-identical, changes trained parts, and puts no LoRA module inside a frozen part;
- batched greedy generation equals one-at-a-time generation;
- the adapter reloads with plain peft and `final/` with plain transformers, generating the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_config
from vlmtune.cli import main
from vlmtune.config import PartConfig, TrainingConfig, VisualEncoderSettings
from vlmtune.data.collate import Collator, Encoder, SFTDataset
from vlmtune.data.sources import Sample
from vlmtune.eval.generate import GenerationSettings, generate
from vlmtune.models.families import FAMILIES
from vlmtune.models.loading import ModelConfig, load_model
from vlmtune.train.adapt import apply_plan
from vlmtune.train.optim import param_groups
from vlmtune.train.plan import plan_parts
from vlmtune.train.outputs import save_outputs

FAMILY_NAMES = sorted(f for f in FAMILIES if FAMILIES[f].build_tiny is not None)
MODES = {"projector": {"projector"}, "llm": {"projector", "llm"}, "vision": {"projector", "vision"}, "both": {"projector", "vision", "llm"}}


def _msg(role, text, image=False):
    return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _samples(shapes_dir) -> list[Sample]:
    img = [str(p) for p in sorted((shapes_dir / "images").glob("*.png"))[:3]]
    return [
        Sample("single", [_msg("user", "What color is the shape?", True), _msg("assistant", "red")], [img[0]]),
        Sample("multi", [_msg("user", "What shape is it?", True), _msg("assistant", "circle"),
                         _msg("user", "Is it small?"), _msg("assistant", "yes")], [img[1]]),
        Sample("third", [_msg("user", "Describe the image.", True), _msg("assistant", "a blue square")], [img[2]]),
    ]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def loaded(request):
    fam = request.param
    return fam, load_model(ModelConfig(name=fam, hf_model_id=f"tiny:{fam}", torch_dtype="float32", min_pixels=3136, max_pixels=3136))


def _fresh(fam: str):
    return load_model(ModelConfig(name=fam, hf_model_id=f"tiny:{fam}", torch_dtype="float32", min_pixels=3136, max_pixels=3136))


def test_inspect_finds_three_parts_that_sum_to_the_total(loaded, capsys):
    fam, _ = loaded
    assert main(["inspect", f"tiny:{fam}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    parts = info["report"]["parts"]
    assert info["family"] == fam
    for p in ("vision", "projector", "llm"):
        assert parts[p]["total"] > 0, p
    assert sum(v["total"] for v in parts.values()) == info["report"]["total_parameters"]
    assert parts.get("other", {"total": 0})["total"] == 0, "parameters outside the three parts"
    # every never-trained prefix names real parameters (a stale path would silently freeze nothing)
    names = [n for n, _ in loaded[1].model.named_parameters()]
    for prefix in loaded[1].family.never_trained_in(loaded[1].model):
        assert any(n.startswith(prefix) for n in names), f"never_trained prefix {prefix!r} matches no parameter"


def test_preview_supervises_answer_and_end_of_turn(loaded, shapes_dir, tmp_path, capsys):
    fam, lm = loaded
    data = tmp_path / "d.jsonl"
    recs = []
    for s in _samples(shapes_dir)[:2]:
        msgs = [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]} for m in s.messages]
        recs.append({"id": s.id, "messages": msgs, "images": [str(Path(p).relative_to(shapes_dir)) for p in s.images]})
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", data={"train_jsonl": str(data), "train_csv": None, "image_root": str(shapes_dir)},
                       models=[{"name": "m", "hf_model_id": f"tiny:{fam}", "min_pixels": 3136, "max_pixels": 3136}])
    assert main(["preview", str(cfg), "--n", "2", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    eot = lm.family.end_of_turn
    # One supervised run per assistant turn: the answer and the end-of-turn token, nothing
    # else (a leading space belongs to the answer's first BPE token, as in " red").
    assert [t.lstrip(" ") for t in rows[0]["supervised_segments"]] == ["red" + eot]
    assert [t.lstrip(" ") for t in rows[1]["supervised_segments"]] == ["circle" + eot, "yes" + eot]
    assert rows[1]["supervised_text"] == "".join(rows[1]["supervised_segments"])
    assert rows[0]["n_image_tokens"] > 0


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_trains_exactly_the_planned_parts(loaded, shapes_dir, mode, method):
    fam, _ = loaded
    lm = _fresh(fam)
    trained = MODES[mode]
    tcfg = TrainingConfig(training_mode=mode, parts={p: PartConfig(train=method) for p in trained})
    plan = plan_parts(tcfg, VisualEncoderSettings())
    from vlmtune.config import LoraConfig

    model = apply_plan(lm.model, lm.parts, lm.family, plan, LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def part(name: str) -> str:
        return lm.parts.part_of(name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace("modules_to_save.default.", "").replace("original_module.", ""))

    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and len(getattr(mod, "lora_A", {})) > 0:
            assert part(name) in trained, f"LoRA module {name} sits in frozen part {part(name)}"
    enc = Encoder(lm.processor, lm.family)
    ds = SFTDataset(_samples(shapes_dir)[:2], enc, 4096)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    opt = torch.optim.AdamW(param_groups(model, lm.parts, plan, 1e-2, 0.0), lr=1e-2)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    # DDP fails on trainable parameters that never get a gradient: families freeze them
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable but never receive a gradient (add to the family's never_trained): {no_grad[:5]}"
    opt.step()
    changed: dict[str, int] = {}
    for n, p in model.named_parameters():
        same = torch.equal(p.detach(), before[n])
        if part(n) not in trained:
            assert same, f"{n} ({part(n)}) is frozen in mode {mode} but changed"
        elif not same:
            changed[part(n)] = changed.get(part(n), 0) + 1
    for p in trained:
        assert changed.get(p, 0) > 0, f"part {p} trains in mode {mode}/{method} but nothing in it changed"


def test_batched_generation_equals_one_at_a_time(loaded, shapes_dir):
    fam, lm = loaded
    enc = Encoder(lm.processor, lm.family)
    samples = _samples(shapes_dir)
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=5)
    batched = generate(lm.model, enc, samples, 3, settings)
    single = generate(lm.model, enc, samples, 1, settings)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert all(r["n_generated_tokens"] == 5 for r in batched)


def test_adapter_and_final_reload_with_plain_libraries(loaded, shapes_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtune.config import LoraConfig

    fam, _ = loaded
    lm = _fresh(fam)
    plan = plan_parts(TrainingConfig(training_mode="both"), VisualEncoderSettings())
    model = apply_plan(lm.model, lm.parts, lm.family, plan, LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # make the adapter matter: LoRA B starts at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    merged = save_outputs(model, lm, tmp_path)
    enc = Encoder(lm.processor, lm.family)
    samples = _samples(shapes_dir)
    settings = GenerationSettings(max_new_tokens=5)
    ours = [r["prediction"] for r in generate(merged, enc, samples, 3, settings)]
    base = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(tmp_path / "lora_adapter"))
    assert [r["prediction"] for r in generate(peft_model, enc, samples, 3, settings)] == ours
    final = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final"))
    assert [r["prediction"] for r in generate(final, enc, samples, 3, settings)] == ours


def test_final_processor_loads_with_plain_transformers(loaded, tmp_path):
    """final/ holds the processor as `vlmtune export` writes it: the image processor and the
    tokenizer load with plain transformers, the chat template is the one evaluation renders
    with (the family's for BLIP-2/PaliGemma), and a Qwen-style processor's video processor finds
    its config (the legacy preprocessor_config.json), so `AutoProcessor` fails only for want of
    torchvision, not of a file."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    from vlmtune.models.processors import has_torchvision

    fam, _ = loaded
    lm = _fresh(fam)
    template_before = lm.processor.chat_template
    save_outputs(lm.model, lm, tmp_path)
    final = tmp_path / "final"
    assert lm.processor.chat_template == template_before  # saving leaves the live processor as evaluation uses it

    ip = AutoImageProcessor.from_pretrained(str(final))
    assert ip.to_dict()["size"] == lm.processor.image_processor.to_dict()["size"]  # the run's resolution, saved
    assert AutoTokenizer.from_pretrained(str(final)).get_vocab() == lm.processor.tokenizer.get_vocab()
    wanted = lm.processor.chat_template or lm.family.chat_template
    if lm.family.needs_video_processor:
        assert (final / "preprocessor_config.json").is_file()
        config, _ = BaseVideoProcessor.get_video_processor_dict(str(final))  # what AutoVideoProcessor reads first
        assert config["size"] == ip.to_dict()["size"]
        if has_torchvision():
            assert type(AutoProcessor.from_pretrained(str(final))).__name__ == type(lm.processor).__name__
        else:
            with pytest.raises(ImportError, match="[Tt]orchvision"):
                AutoProcessor.from_pretrained(str(final))
        assert (final / "chat_template.jinja").read_text() == wanted
    else:
        proc = AutoProcessor.from_pretrained(str(final))
        assert type(proc).__name__ == type(lm.processor).__name__
        # Blip2Processor takes no chat_template argument: transformers hands the file to its tokenizer
        assert (proc.chat_template or proc.tokenizer.chat_template) == wanted


@pytest.mark.parametrize("model_type, checkpoint_type, family", [
    # seed 003: qwen_vl covers Qwen-VL, Qwen2-VL and Qwen2.5-VL (and here Qwen3-VL)
    ("qwen_vl", "qwen2_vl", "qwen2_vl"), ("qwen_vl", "qwen2_5_vl", "qwen2_5_vl"), ("qwen_vl", "qwen3_vl", "qwen3_vl"),
    ("qwen2_vl", "qwen2_vl", "qwen2_vl"),
    # llava covers llava, llava_next, llava_gemma
    ("llava", "llava", "llava"), ("llava", "llava_next", "llava_next"), ("llava_next", "llava_next", "llava_next"),
    ("llava_gemma", "llava", "llava"),
    ("blip2", "blip-2", "blip2"), ("blip-2", "blip-2", "blip2"),
    # omitted: derived from the checkpoint's config
    (None, "gemma3", "gemma3"), (None, "paligemma", "paligemma"), (None, "idefics3", "idefics3"), (None, "smolvlm", "smolvlm"),
    ("smolvlm", "idefics3", "idefics3"),  # SmolVLM v1 checkpoints are idefics3
])
def test_seed_model_types_map_to_families(model_type, checkpoint_type, family):
    from vlmtune.models.families import find_family

    assert find_family(model_type, checkpoint_type).name == family


def test_model_type_that_contradicts_the_checkpoint_is_refused():
    from vlmtune.errors import UserError
    from vlmtune.models.families import find_family

    with pytest.raises(UserError, match="does not match the checkpoint"):
        find_family("blip2", "qwen2_vl")
    with pytest.raises(UserError, match="unknown model_type"):
        find_family("qwen_vll", "qwen2_vl")


def test_image_processor_overrides_change_the_image_token_count(shapes_dir):
    """Idefics3 tiles: a smaller tile size (models[].image_processor) means more tiles and tokens."""
    from vlmtune.errors import UserError
    from vlmtune.models.loading import load_processor_only

    def n_image_tokens(overrides):
        proc, fam = load_processor_only(ModelConfig(name="i", hf_model_id="tiny:idefics3", image_processor=overrides))
        return Encoder(proc, fam).encode(_samples(shapes_dir)[0]).n_image_tokens

    one_tile = n_image_tokens(None)
    tiled = n_image_tokens({"size": {"longest_edge": 56}, "max_image_size": {"longest_edge": 28}})
    assert tiled == 5 * one_tile  # 2x2 tiles + the global image
    with pytest.raises(UserError, match="has no setting 'do_splitting'"):
        n_image_tokens({"do_splitting": False})


@pytest.mark.parametrize("mode", list(MODES))
def test_inspect_estimate_equals_what_training_makes_trainable(loaded, mode):
    """`vlmtune inspect`'s per-mode estimate is exactly what apply_plan then trains."""
    from vlmtune.config import LoraConfig
    from vlmtune.train.plan import estimate_trainable, parameter_report

    fam, _ = loaded
    lm = _fresh(fam)
    lora = LoraConfig(name="v", r=4, alpha=8, dropout=0.0)
    plan = plan_parts(TrainingConfig(training_mode=mode), VisualEncoderSettings())
    est = estimate_trainable(lm.model, lm.parts, lm.family, plan, lora)
    model = apply_plan(lm.model, lm.parts, lm.family, plan, lora)
    actual = {p: v["trainable"] for p, v in parameter_report(model, lm.parts)["parts"].items() if p != "other"}
    assert est == actual


def test_training_loss_equals_the_models_own_loss(loaded, shapes_dir):
    """train/loss.py computes the loss from the logits (the Trainer then normalises it over a
    whole optimizer step); for a plain batch it must be exactly the family's own loss."""
    from vlmtune.train.loss import token_mean_loss

    fam, lm = loaded
    enc = Encoder(lm.processor, lm.family)
    ds = SFTDataset(_samples(shapes_dir), enc, 4096)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    lm.model.eval()
    with torch.no_grad():
        out = lm.model(**batch)
        labels = batch["labels"]
        ours = token_mean_loss(out, labels)
        n = int((labels[..., 1:] != -100).sum())
        summed = token_mean_loss(out, labels, num_items_in_batch=torch.tensor(n * 2))
    assert torch.allclose(ours, out.loss, atol=1e-5), (fam, ours.item(), out.loss.item())
    assert torch.allclose(summed * 2, out.loss, atol=1e-5)  # divided by the step's count, not the batch's

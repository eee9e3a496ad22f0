"""QLoRA: `models[].load_in_4bit` / `load_in_8bit` quantize only the LLM's linear layers.

- after a 4-bit (or 8-bit) load the vision encoder, the projector and the LM head are plain
  full-precision `nn.Linear`s while every other linear layer of the LLM is a bitsandbytes one;
  the kept set comes from the family's parts (Qwen2.5-VL, Idefics3, SmolVLM, BLIP-2) or from
  inspection (a VipLLaVA no family describes);
- both keys at once, an LLM trained fully in 4-bit, and a quantized run where nothing uses
  LoRA are refused with one line;
- an eval-mode `torch.no_grad()` forward (any evaluation) before training leaves the next
  training step, gradients included, exactly as without it;
- `python -m vlmtune.cli train` with `load_in_4bit: true` trains tiny Qwen2.5-VL and Idefics3
  end to end (evaluating during training, Idefics3 with gradient checkpointing); the saved
  `lora_adapter/` loads with plain peft onto the *unquantized* base and gives finite logits,
  and `final/` is that adapter merged into the full-precision base.

bitsandbytes runs 4-bit and 8-bit on CPU (`device_map="cpu"`), so all of this runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn

from conftest import write_config, subprocess_env as _env
from vlmtune.cli import main
from vlmtune.config import LoraConfig, ModelConfig, TrainingConfig, VisualEncoderSettings
from vlmtune.data.collate import Collator, Encoder, SFTDataset
from vlmtune.data.sources import Sample
from vlmtune.errors import UserError
from vlmtune.models.loading import load_model, load_processor_only
from vlmtune.models.tiny import tiny_dir
from vlmtune.train.adapt import apply_plan
from vlmtune.train.plan import plan_parts

QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 3136}


def _mcfg(family: str, **kw) -> ModelConfig:
    return ModelConfig(name="q", hf_model_id=f"tiny:{family}", **(QWEN_PIXELS if family.startswith("qwen") else {}), **kw)


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _assert_only_llm_quantized(model: nn.Module, parts, quantized_cls: type, weight_cls: type) -> None:
    """Every linear layer in the vision/projector roots and the LM head is a plain nn.Linear with
    a float weight; every other linear layer of the LLM is `quantized_cls` with `weight_cls`."""
    kept_roots = parts.roots["vision"] + parts.roots["projector"]
    head = model.get_output_embeddings()
    n_kept = n_quant = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if _under(name, kept_roots) or m is head:
            assert type(m) is nn.Linear, f"{name} ({parts.part_of(name)}) was quantized: {type(m).__name__}"
            assert not isinstance(m.weight, (bnb.nn.Params4bit, bnb.nn.Int8Params)) and m.weight.is_floating_point(), name
            n_kept += 1
        else:
            assert parts.part_of(name) == "llm", name
            assert isinstance(m, quantized_cls) and isinstance(m.weight, weight_cls), f"LLM linear {name} is {type(m).__name__}"
            n_quant += 1
    assert n_kept > 0 and n_quant > 0 and parts.roots["vision"] and parts.roots["projector"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3", "smolvlm", "blip2"])
def test_4bit_quantizes_only_the_llm(family):
    lm = load_model(_mcfg(family, load_in_4bit=True))
    assert lm.quant_bits == 4
    _assert_only_llm_quantized(lm.model, lm.parts, bnb.nn.Linear4bit, bnb.nn.Params4bit)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "blip2"])
def test_8bit_keeps_the_same_parts(family):
    lm = load_model(_mcfg(family, load_in_8bit=True))
    assert lm.quant_bits == 8
    _assert_only_llm_quantized(lm.model, lm.parts, bnb.nn.Linear8bitLt, bnb.nn.Int8Params)


def test_generic_path_keeps_inspected_parts(tmp_path):
    """A model without a family (VipLLaVA): the kept parts come from inspecting its structure,
    built on the meta device before the weights load."""
    from conftest import build_tiny_vipllava

    build_tiny_vipllava(tmp_path)
    lm = load_model(ModelConfig(name="v", hf_model_id=str(tmp_path), load_in_4bit=True))
    assert lm.family is None and lm.parts.found_by == "inspection"
    _assert_only_llm_quantized(lm.model, lm.parts, bnb.nn.Linear4bit, bnb.nn.Params4bit)


def _one_line(e: pytest.ExceptionInfo) -> str:
    line = e.value.line()
    assert "\n" not in line and " — " in line, line
    return line


def test_both_bit_widths_refused():
    with pytest.raises(UserError) as e:
        load_model(_mcfg("qwen2_5_vl", load_in_4bit=True, load_in_8bit=True), where="models[0]")
    line = _one_line(e)
    assert line.startswith("models[0].load_in_8bit: ") and "both" in line


@pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit"])
def test_llm_trained_fully_in_a_quantized_load_refused(key):
    with pytest.raises(UserError) as e:
        load_model(_mcfg("idefics3", **{key: True}), where="models[0]", full_precision_parts=("projector", "llm"))
    line = _one_line(e)
    assert line.startswith(f"models[0].{key}: ") and "fully" in line and "lora" in line


# ------------------------------------------------------------------------------------------
# The no_grad trap.

def _samples(shapes_dir: Path) -> list[Sample]:
    img = [str(p) for p in sorted((shapes_dir / "images").glob("*.png"))[:2]]
    msg = lambda role, text, image=False: {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}  # noqa: E731
    return [Sample(f"s{i}", [msg("user", "What color is the shape?", True), msg("assistant", a)], [img[i]]) for i, a in enumerate(("red", "blue"))]


def _qlora_step(family: str, shapes_dir: Path, eval_first: bool) -> dict[str, torch.Tensor]:
    """Load 4-bit, apply the default plan (LLM LoRA, projector full), optionally run an
    evaluation-style forward (eval mode, no_grad), then one training forward/backward.
    Returns the gradients of the trainable tensors."""
    lm = load_model(_mcfg(family, load_in_4bit=True))
    plan = plan_parts(TrainingConfig(), VisualEncoderSettings())
    torch.manual_seed(0)  # the same LoRA init in both calls
    model = apply_plan(lm.model, lm.parts, lm.family, plan, LoraConfig(r=4, alpha=8, dropout=0.0))
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_no_grad_eval_forward_does_not_change_the_next_training_step(family, shapes_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval/no_grad forward
    (on CPUs with AVX512-BF16): afterwards Qwen's biased q/k/v fail with an in-place error and
    Idefics3's bias-free layers silently lose their input gradient (LoRA in earlier layers gets
    wrong gradients). The loader keeps the trainable layout; gradients must match exactly."""
    ref = _qlora_step(family, shapes_dir, eval_first=False)
    got = _qlora_step(family, shapes_dir, eval_first=True)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), f"{n}: gradient changed by an earlier no_grad forward"


# ------------------------------------------------------------------------------------------
# End to end through the CLI.

RUN = "q__r8"



def _cli_train(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtune.cli", "train", str(cfg)], capture_output=True, text=True, env=_env(), timeout=600)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "idefics3"])
def qlora_run(request, shapes_dir, tmp_path_factory) -> tuple[str, Path]:
    """Three QLoRA steps (default plan: LLM LoRA, projector full), evaluating the loss every
    step (an eval-mode no_grad forward between training steps); Idefics3 also with gradient
    checkpointing. Returns (family, run dir)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"qlora-{family}")
    training = {"max_steps": 3, "save_steps": 3, "eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4,
                "gradient_checkpointing": family == "idefics3"}
    model = {"name": "q", "hf_model_id": f"tiny:{family}", "load_in_4bit": True, **(QWEN_PIXELS if family.startswith("qwen") else {})}
    cfg = write_config(tmp / "c.yaml", shapes_dir, tmp / "out", models=[model], training=training, evaluation={"enabled": False})
    r = _cli_train(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return family, tmp / "out" / RUN


def _batch(family: str, shapes_dir: Path) -> dict[str, torch.Tensor]:
    proc, fam = load_processor_only(_mcfg(family))
    ds = SFTDataset(_samples(shapes_dir), Encoder(proc, fam), 4096)
    return Collator(proc.tokenizer.pad_token_id)([ds[0], ds[1]])


def _plain_peft(family: str, run: Path) -> nn.Module:
    """The adapter on the unquantized base, with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(tiny_dir(f"tiny:{family}")))
    return PeftModel.from_pretrained(base, str(run / "lora_adapter")).eval()


def test_qlora_cli_trains_and_adapter_loads_on_unquantized_base(qlora_run, shapes_dir):
    family, run = qlora_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and len(metrics["eval_loss_history"]) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["train_loss_history"])
    model = _plain_peft(family, run)
    # The adapter carries the fully trained projector (trained in full precision) and LoRA on the LLM.
    names = [n for n, _ in model.named_parameters()]
    assert any(".modules_to_save." in n for n in names) and any(".lora_A." in n for n in names)
    with torch.no_grad():
        logits = model(**_batch(family, shapes_dir)).logits
    assert torch.isfinite(logits).all()


def test_qlora_final_is_the_adapter_merged_into_the_full_precision_base(qlora_run, shapes_dir):
    """`final/` of a QLoRA run: no bitsandbytes weights or quantization config, and the same
    logits as the adapter on the unquantized base (merging into the 4-bit weights instead
    would requantize W + BA, rounding the trained delta away)."""
    from transformers import AutoModelForImageTextToText

    family, run = qlora_run
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())
    final = AutoModelForImageTextToText.from_pretrained(str(run / "final")).eval()
    assert not any(isinstance(m, QUANTIZED) for m in final.modules())
    batch = _batch(family, shapes_dir)
    with torch.no_grad():
        want = _plain_peft(family, run)(**batch).logits
        got = final(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training, says", [
    ({"parts": {"llm": {"train": "full"}}}, "trains fully"),  # a quantized LLM cannot train fully
    ({"training_mode": "projector"}, "no part trains with LoRA"),  # a quantized model trains only through adapters
])
def test_qlora_impossible_plans_refused_by_the_cli(shapes_dir, tmp_path, capsys, training, says):
    """`vlmtune train` refuses in one line (exit 1, no traceback), before any run directory
    appears. In-process `main`: a refusal needs no fresh interpreter, and any other exception
    propagates and fails the test."""
    model = {"name": "q", "hf_model_id": "tiny:qwen2_5_vl", "load_in_4bit": True, **QWEN_PIXELS}
    cfg = write_config(tmp_path / "c.yaml", shapes_dir, tmp_path / "out", models=[model], evaluation={"enabled": False}, training=training)
    assert main(["train", str(cfg)]) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and "load_in_4bit" in err[0] and says in err[0], err
    assert not (tmp_path / "out" / RUN).exists()


@pytest.mark.parametrize("weights", ["final", "adapter"])
def test_evaluating_a_qlora_run_uses_full_precision_weights(qlora_run, weights):
    """`vlmtune evaluate --run` on a QLoRA run: final/ is full precision, and the adapter goes
    onto the full-precision base (merged into 4-bit weights its training would round away)."""
    from vlmtune.eval.standalone import load_run

    _, run = qlora_run
    em = load_run(run, weights)
    assert not any(isinstance(m, QUANTIZED) for m in em.model.modules())

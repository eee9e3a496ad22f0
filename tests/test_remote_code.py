"""Models outside `AutoModelForImageTextToText` (issue #16 item 7): remote code that loads
through `AutoModelForCausalLM` / `AutoModel`, like InternVL, DeepSeek-OCR.

The tests write a tiny remote-code model themselves (tests/remote_tinyvl.py): its
`config.json` maps `AutoModelForCausalLM` to `modeling_tinyvl.py` beside it. It loads only
with `trust_remote_code: true`; with InternVL's module names inspection finds its parts; with
odd names it says which `models[].parts` to write, and with them it trains per part.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_config
from remote_tinyvl import INTERNVL_NAMES, ODD_NAMES, build_tiny_remote
from vlmtune.cli import main
from vlmtune.config import LoraConfig, ModelConfig, TrainingConfig, VisualEncoderSettings
from vlmtune.data.collate import Collator, Encoder, SFTDataset
from vlmtune.data.sources import Sample
from vlmtune.errors import UserError
from vlmtune.models.loading import full_precision_roots, load_model, model_auto_class
from vlmtune.train.adapt import apply_plan
from vlmtune.train.plan import plan_parts, strip_wrappers

INTERNVL_PARTS = {"vision": ["vision_model"], "projector": ["mlp1"], "llm": ["language_model.model", "language_model.lm_head"]}


@pytest.fixture(scope="module", params=[True, False], ids=["own-embedding-methods", "no-embedding-methods"])
def internvl_dir(tmp_path_factory, request):
    # without its own get_input/get_output_embeddings, the head is found in its language model
    return build_tiny_remote(tmp_path_factory.mktemp("tinyvl_internvl"), INTERNVL_NAMES, embeddings=request.param)


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    # odd names, and no get_input_embeddings / get_output_embeddings of its own
    return build_tiny_remote(tmp_path_factory.mktemp("tinyvl_odd"), ODD_NAMES, embeddings=False)


def _mcfg(path, **kw) -> ModelConfig:
    return ModelConfig(name="r", hf_model_id=str(path), torch_dtype="float32", **kw)


def _sample(shapes_dir) -> Sample:
    img = str(sorted((shapes_dir / "images").glob("*.png"))[0])
    return Sample("x", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], [img])


def test_remote_code_loads_only_when_trusted(internvl_dir, capsys):
    with pytest.raises(UserError) as e:
        load_model(_mcfg(internvl_dir), where="models[0]")
    assert "\n" not in e.value.line() and "trust_remote_code: true" in e.value.line()
    assert main(["inspect", str(internvl_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trust_remote_code: true" in err[0], err
    # The auto class: a config transformers knows but whose repository maps its own code
    # (auto_map) is remote code too; an auto_map naming only other auto classes, or a native
    # model that is no VLM, is one line each.
    from transformers import LlamaConfig

    cfg = LlamaConfig()
    cfg.auto_map = {"AutoConfig": "c.C", "AutoModel": "m.M"}
    with pytest.raises(UserError, match="loads only through its own Python code .*AutoModel.* — set trust_remote_code: true"):
        model_auto_class(cfg, _mcfg("x"), "x", "models[0]")
    assert model_auto_class(cfg, _mcfg("x", trust_remote_code=True), "x", "models[0]").__name__ == "AutoModel"
    cfg.auto_map = {"AutoConfig": "c.C", "AutoModelForCausalLM": "m.M", "AutoModel": "m.M"}
    assert model_auto_class(cfg, _mcfg("x", trust_remote_code=True), "x", "models[0]").__name__ == "AutoModelForCausalLM"
    cfg.auto_map = {"AutoModelForSeq2SeqLM": "m.M"}
    with pytest.raises(UserError, match="none of which vlmtune loads"):
        model_auto_class(cfg, _mcfg("x", trust_remote_code=True), "x", "models[0]")
    with pytest.raises(UserError, match="is not an image-text-to-text model"):
        model_auto_class(LlamaConfig(), _mcfg("x", trust_remote_code=True), "x", "models[0]")


def test_trusted_remote_code_loads_and_inspection_finds_its_parts(internvl_dir, shapes_dir, capsys):
    from vlmtune.eval.generate import GenerationSettings, generate_batches

    lm = load_model(_mcfg(internvl_dir, trust_remote_code=True), where="models[0]")
    assert type(lm.model).__name__ == "TinyVLForCausalLM" and type(lm.model).__module__.startswith("transformers_modules.")
    assert lm.family is None and lm.parts.found_by == "inspection" and not lm.parts.unresolved
    assert lm.parts.roots == INTERNVL_PARTS
    # InternVL-style generate returns only the new tokens: evaluation must still see them
    enc = Encoder(lm.processor, None)
    [[rec]] = list(generate_batches(lm.model, enc, [_sample(shapes_dir)], 1, GenerationSettings(max_new_tokens=3)))
    assert rec["n_generated_tokens"] == 3 and rec["n_prompt_tokens"] > 16
    # a quantized load keeps vision, projector and head in full precision: roots from the
    # remote class built on the meta device
    keep = full_precision_roots(lm.model.config, _mcfg(internvl_dir, trust_remote_code=True), None, [], "models[0]", 4)
    assert keep == ["language_model.lm_head", "mlp1", "vision_model"]

    assert main(["inspect", str(internvl_dir), "--trust-remote-code", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class"] == "TinyVLForCausalLM" and info["family"] == "generic" and info["parts"] == INTERNVL_PARTS
    parts = info["report"]["parts"]
    assert all(parts[p]["total"] > 0 for p in ("vision", "projector", "llm")) and parts["other"]["total"] == 0
    assert all("error" not in m["trainable_parameters_lora_r16"] for m in info["modes"].values()), info["modes"]


@pytest.mark.parametrize("mode, trained", [("projector", {"projector"}), ("llm", {"projector", "llm"}), ("vision", {"projector", "vision"})])
def test_remote_code_model_trains_per_part(internvl_dir, shapes_dir, mode, trained):
    lm = load_model(_mcfg(internvl_dir, trust_remote_code=True), where="models[0]")
    plan = plan_parts(TrainingConfig(training_mode=mode), VisualEncoderSettings())
    model = apply_plan(lm.model, lm.parts, None, plan, LoraConfig(name="v", r=4, alpha=8, dropout=0.0))
    enc = Encoder(lm.processor, None)
    batch = Collator(lm.processor.tokenizer.pad_token_id)([SFTDataset([_sample(shapes_dir)], enc, 512)[0]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    opt.step()
    changed = {lm.parts.part_of(strip_wrappers(n)) for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trained


def _train_config(tmp_path, shapes_dir, model_dir, **model):
    return write_config(
        tmp_path / "c.yaml", shapes_dir, tmp_path / "out",
        models=[{"name": "r", "hf_model_id": str(model_dir), "trust_remote_code": True, "torch_dtype": "float32", **model}],
        training={"max_steps": 2, "per_device_train_batch_size": 2, "training_mode": "llm", "save_strategy": "no"},
        evaluation={"enabled": False},
    )


def test_parts_inspection_cannot_find_are_named_in_the_config(odd_dir, shapes_dir, tmp_path, capsys):
    lm = load_model(_mcfg(odd_dir, trust_remote_code=True), where="models[0]")
    assert "no separate vision encoder" in lm.parts.unresolved
    # training the llm: one line naming the exact models[0].parts to write
    assert main(["train", str(_train_config(tmp_path, shapes_dir, odd_dir))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models[0].parts: {vision: eye, projector: bridge, llm: decoder}" in err[0], err
    assert not (tmp_path / "out").exists()

    # with those parts it trains: LoRA on the llm, the projector fully, the vision encoder frozen
    cfg = _train_config(tmp_path, shapes_dir, odd_dir, parts={"vision": "eye", "projector": ["bridge"], "llm": "decoder"})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "out" / "r__r8"
    report = json.loads((run / "parameter_report.json").read_text())["parts"]
    assert report["vision"]["total"] > 0 and report["vision"]["trainable"] == 0
    assert report["projector"]["trainable"] == report["projector"]["total"] > 0
    assert 0 < report["llm"]["trainable"] < report["llm"]["total"]
    assert report["other"]["total"] == 0
    # final/ is the merged model with its code beside it: it loads again the same way
    assert (run / "final" / "modeling_tinyvl.py").exists()
    again = load_model(_mcfg(run / "final", trust_remote_code=True, parts={"vision": ["eye"], "projector": ["bridge"], "llm": ["decoder"]}), where="models[0]")
    assert again.parts.found_by == "config" and again.parts.roots == {"vision": ["eye"], "projector": ["bridge"], "llm": ["decoder"]}


def test_bad_part_paths_are_one_line(odd_dir, shapes_dir, tmp_path, capsys):
    cfg = _train_config(tmp_path, shapes_dir, odd_dir, parts={"vision": "eyes", "projector": "bridge", "llm": "decoder"})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: models[0].parts.vision: TinyVLForCausalLM has no module 'eyes'") and "eye" in err[0].split(" — ")[1], err
    assert not (tmp_path / "out").exists()
    # a part the config does not name, where inspection found none: name all three
    with pytest.raises(UserError, match=r"names vision, llm but not projector.* add \{projector: bridge\}"):
        load_model(_mcfg(odd_dir, trust_remote_code=True, parts={"vision": ["eye"], "llm": ["decoder"]}), where="models[0]")
    with pytest.raises(UserError, match="named for both"):
        load_model(_mcfg(odd_dir, trust_remote_code=True, parts={"vision": ["eye"], "projector": ["eye"], "llm": ["decoder"]}), where="models[0]")
    # an unknown part name is a config error before anything loads
    cfg = _train_config(tmp_path, shapes_dir, odd_dir, parts={"visoin": "eye"})
    assert main(["train", str(cfg)]) == 1
    assert "models[0].parts.visoin: unknown part — did you mean `vision`?" in capsys.readouterr().err


def test_a_whole_model_checkpoint_resumes_through_the_models_own_code(odd_dir, tmp_path):
    """A whole-model (no LoRA) checkpoint is read back on resume through `from_pretrained`
    (train/checkpointing.py; the FSDP path reads it the same way): with the auto class and the
    trusted remote code the run's model loaded with, the weights come back exactly. (Read with
    AutoModelForImageTextToText and no trust_remote_code, a remote-code model could not resume.)"""
    from vlmtune.models.loading import runs_remote_code
    from vlmtune.train.checkpointing import CheckpointMixin

    parts = {"vision": ["eye"], "projector": ["bridge"], "llm": ["decoder"]}
    model = load_model(_mcfg(odd_dir, trust_remote_code=True, parts=parts), where="models[0]").model
    assert runs_remote_code(model) and not runs_remote_code(torch.nn.Linear(1, 1))
    with torch.no_grad():  # "trained" weights, saved as the Trainer saves a whole model
        for p in model.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "checkpoint-2"
    model.save_pretrained(ckpt)
    assert (ckpt / "modeling_tinyvl.py").exists()  # the model's code travels with its checkpoint
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # a fresh process's model, before the resume loads the checkpoint
        for p in model.parameters():
            p.zero_()

    class Resuming(CheckpointMixin):
        def __init__(self, model: torch.nn.Module):
            self.model = model

    Resuming(model)._load_from_checkpoint(str(ckpt))
    now = model.state_dict()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], v) for k, v in saved.items())

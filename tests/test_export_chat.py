"""`vlmtune export` and `vlmtune chat` on one tiny trained run: the exported folder loads with
plain transformers and generates what the run's final/ generated (by default, from its
generation_config.json), casts to bfloat16, carries a model card made from the run's files and
pushes through the real hub client (stubbed here: nothing reaches the network); chat answers
exactly what evaluation predicted for the same image and question, and keeps a conversation
going from stdin. Bad input is one line."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_config
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.data.collate import Encoder
from vlmtune.data.sources import Sample, load_split
from vlmtune.eval.generate import GenerationSettings, PromptStyle, build_prompt, generate
from vlmtune.models.families import FAMILIES
from vlmtune.models.processors import image_only

QWEN = FAMILIES["qwen2_5_vl"]


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exportrun")
    cfg = write_config(tmp / "c.yaml", shapes_dir, tmp / "out", training={"max_steps": 2},
                       evaluation={"enabled": True, "batch_size": 4, "metrics": ["exact_match", "rouge_l"]})
    assert main(["train", str(cfg)]) == 0
    return cfg, tmp / "out" / "q__r8"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, run = trained
    out = tmp_path_factory.mktemp("exports") / "tiny-vlm"
    assert main(["export", str(run), "--to", str(out)]) == 0
    return out


def _predictions(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "predictions.jsonl").read_text().splitlines()]


def _one_line_error(capsys, argv: list[str], starts: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {starts}"), err
    return err[0]


def test_export_loads_with_plain_transformers_and_generates_like_final(trained, exported):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    cfg_path, run = trained
    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json", "preprocessor_config.json",
                 "tokenizer.json", "chat_template.jinja", "README.md"):
        assert (exported / name).is_file(), name
    assert sorted(p.name for p in exported.parent.iterdir()) == ["tiny-vlm"]  # no temp or .old folder left beside it

    gc = json.loads((exported / "generation_config.json").read_text())
    assert gc["max_new_tokens"] == 4 and gc["do_sample"] is False and gc["num_beams"] == 1  # the run's generation_* settings
    # AutoProcessor needs torchvision for Qwen-VL's video processor (absent here): the image-only
    # class stands in, as in test_train_e2e; the image processor's own file loads as it is
    assert AutoImageProcessor.from_pretrained(exported).size == {"shortest_edge": 3136, "longest_edge": 3136}
    proc = image_only(QWEN.processor_class()).from_pretrained(str(exported))
    assert proc.image_processor.size == {"shortest_edge": 3136, "longest_edge": 3136}  # the run's resolution, saved

    ours = AutoModelForImageTextToText.from_pretrained(str(exported))
    final = AutoModelForImageTextToText.from_pretrained(str(run / "final"))
    samples = load_split(load_config(cfg_path), "test")
    enc = Encoder(proc, QWEN)
    preds = [r["prediction"] for r in generate(ours, enc, samples, 4, GenerationSettings(max_new_tokens=4))]
    assert preds == [r["prediction"] for r in _predictions(run)]
    # a plain generate() with no settings at all decodes like evaluation: generation_config.json
    from vlmtune.data.images import load_image

    s = samples[0]
    inputs = enc.encode_prompts([build_prompt(enc, s, PromptStyle())], [[load_image(p) for p in s.images]])
    with torch.no_grad():
        plain = ours.generate(**inputs)
        ref = final.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, ref)


def test_export_dtype_bfloat16(trained, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    _, run = trained
    assert main(["export", str(run), "--to", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "merged model in bfloat16" in (tmp_path / "bf16" / "README.md").read_text()


def test_a_run_without_final_exports_its_adapter_merged_onto_the_base(trained, exported, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    _, run = trained
    bare = tmp_path / "q__r8"  # the run without final/ (and its checkpoints)
    shutil.copytree(run, bare, ignore=lambda d, names: [n for n in names if d == str(run) and n in ("final", "checkpoints")])
    dest = tmp_path / "a" / "b"  # parents made as needed
    assert main(["export", str(bare), "--to", str(dest)]) == 0
    assert "lora_adapter/ + base" in capsys.readouterr().out
    ours, theirs = load_file(dest / "model.safetensors"), load_file(exported / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_model_card_gives_base_data_plan_and_metrics(trained, exported):
    from vlmtune.eval.generate import GenerationSettings as GS
    from vlmtune.experiment.export import model_card
    from vlmtune.eval.standalone import read_run_config
    from vlmtune.train.rundir import RunDir

    _, run = trained
    text = (exported / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"vlmtune", "lora", "qwen2_5_vl"} <= set(meta["tags"])
    assert "base_model" not in meta  # tiny:qwen2_5_vl is no hub repository
    metrics = json.loads((run / "metrics.json").read_text())
    gen = json.loads((run / "generation_metrics.json").read_text())
    assert "**tiny:qwen2_5_vl**" in body
    assert "| train | `train.csv` (data.train_csv) | 24 |" in body and "| test | `test.csv` (data.test_csv) | 8 evaluated |" in body
    assert "| llm | lora |" in body and "| vision | frozen | 0 /" in body and "LoRA r=8, alpha=16" in body
    assert f"final train loss {metrics['final_train_loss']:.4f}" in body
    assert f"| exact_match | {gen['exact_match']['value']:.4f} |" in body and "| rouge_l |" in body
    assert 'from_pretrained("tiny-vlm")' in body and "max_new_tokens 4" in body
    # a hub base model goes into the front matter, where the hub links the two
    cfg = read_run_config(run)
    cfg = dataclasses.replace(cfg, models=[dataclasses.replace(cfg.models[0], hf_model_id="Qwen/Qwen2.5-VL-3B-Instruct")])
    meta = yaml.safe_load(model_card(cfg, RunDir(run), "final/", "float32", GS(), "me/x").split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_push_to_hub_uploads_the_export_through_the_hub_client(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import HfApi

    _, run = trained
    calls: list[tuple] = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw, self.token))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def failing_upload(self, **kw):
        raise ConnectionError("Network is unreachable\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    dest = tmp_path / "pushed"
    line = _one_line_error(capsys, ["export", str(run), "--to", str(dest), "--push-to-hub", "me/tiny-vlm"], "--push-to-hub: upload to me/tiny-vlm failed")
    assert "ConnectionError: Network is unreachable" in line and f"the export in {dest} is complete" in line
    assert (dest / "model.safetensors").is_file()

    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    assert main(["export", str(run), "--to", str(dest), "--force", "--push-to-hub", "me/tiny-vlm", "--private"]) == 0
    assert "pushed -> https://huggingface.co/me/tiny-vlm" in capsys.readouterr().out
    create, upload = calls[-2], calls[-1]
    assert create == ("create_repo", "me/tiny-vlm", {"repo_type": "model", "private": True, "exist_ok": True}, "hf_test")
    assert upload[1]["repo_id"] == "me/tiny-vlm" and upload[1]["folder_path"] == str(dest) and upload[1]["repo_type"] == "model"
    repo = "me/tiny-vlm"  # the model card tells users to load the pushed repo (text only: nothing loads here)
    assert f'from_pretrained("{repo}")' in (dest / "README.md").read_text()


def test_export_errors_are_one_line(trained, exported, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, run = trained
    _one_line_error(capsys, ["export", str(tmp_path / "nope"), "--to", str(tmp_path / "x")], "export: run directory")
    _one_line_error(capsys, ["export", str(tmp_path), "--to", str(tmp_path / "x")], f"{tmp_path}: not a vlmtune run directory")
    _one_line_error(capsys, ["export", str(run), "--to", str(exported)], "--to: ")  # exists, no --force
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert "holds files but no model" in _one_line_error(capsys, ["export", str(run), "--to", str(tmp_path / "notes"), "--force"], "--to: ")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    _one_line_error(capsys, ["export", str(run), "--to", str(run / "export")], "--to: ")  # inside the run
    _one_line_error(capsys, ["export", str(run), "--to", str(run.parent)], "--to: ")  # would swap the run away
    _one_line_error(capsys, ["export", str(run), "--to", str(tmp_path / "y"), "--push-to-hub", "not a repo!"], "--push-to-hub: ")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "no Hugging Face token" in _one_line_error(capsys, ["export", str(run), "--to", str(tmp_path / "y"), "--push-to-hub", "me/x"], "--push-to-hub: ")
    assert not (tmp_path / "y").exists()  # refused before anything loads or is written


def test_chat_answers_what_evaluation_predicted(trained, exported, capsys):
    _, run = trained
    for rec in _predictions(run)[:2]:
        assert main(["chat", str(run), "--image", rec["image"], rec["query"]]) == 0
        assert capsys.readouterr().out == rec["prediction"] + "\n"
    # the exported folder, as a plain model with the run's settings given as flags, answers the same
    rec = _predictions(run)[2]
    assert main(["chat", str(exported), "--image", rec["image"], "--max-new-tokens", "4", "--min-pixels", "3136", "--max-pixels", "3136", rec["query"]]) == 0
    assert capsys.readouterr().out == rec["prediction"] + "\n"


def test_chat_interactive_keeps_the_conversation_until_end_of_input(trained, monkeypatch, capsys):
    from vlmtune.eval import standalone as S

    _, run = trained
    rec = _predictions(run)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{rec['query']}\n\nAnd what shape is it?\n"))
    assert main(["chat", str(run), "--image", rec["image"]]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 2 and answers[0] == rec["prediction"]
    # the second answer continues the first turn: the same two-turn conversation through evaluation's generate
    em = S.load_run(run)
    two_turns = Sample("t", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["query"]}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
                             {"role": "user", "content": [{"type": "text", "text": "And what shape is it?"}]}], [rec["image"]])
    settings = S.settings_from(em.run_config, {})
    assert generate(em.model, em.encoder, [two_turns], 1, settings)[0]["prediction"] == answers[1]


def test_interactive_stops_at_exit():
    from vlmtune.eval.chat import interactive

    class Echo:
        asked: list[str] = []

        def ask(self, q: str) -> str:
            self.asked.append(q)
            return q.upper()

    out = io.StringIO()
    chat = Echo()
    assert interactive(chat, io.StringIO("one\n  \ntwo\nexit\nthree\n"), out) == 2  # type: ignore[arg-type]
    assert chat.asked == ["one", "two"] and out.getvalue() == "ONE\nTWO\n"


def test_chat_errors_are_one_line(trained, tmp_path, capsys):
    _, run = trained
    img = _predictions(run)[0]["image"]
    _one_line_error(capsys, ["chat", str(run), "--image", str(tmp_path / "missing.png"), "hi"], "--image: ")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    _one_line_error(capsys, ["chat", str(run), "--image", str(tmp_path / "broken.png"), "hi"], "--image ")
    _one_line_error(capsys, ["chat", str(run), "--image", img, "--lora-path", str(run / "lora_adapter"), "hi"], "--lora-path: ")
    _one_line_error(capsys, ["chat", str(tmp_path), "--image", img, "hi"], "chat: ")  # neither run nor model folder
    _one_line_error(capsys, ["chat", str(run), "--image", img, "--num-beams", "0", "hi"], "--num-beams")

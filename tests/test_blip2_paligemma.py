"""Family quirks the shared acceptance suite cannot see: PaliGemma's prefix-LM inputs equal
the processor's own `suffix=` encoding and never let an answer token see the answer's
future; BLIP-2's query tokens (prepended by the processor) are never supervised and
generation stops on its "\\n" end of turn."""

from __future__ import annotations

import pytest
import torch

from vlmtune.data.collate import IGNORE_INDEX, Encoder
from vlmtune.data.images import load_image
from vlmtune.data.sources import Sample
from vlmtune.eval.generate import PromptStyle, _end_token_ids, build_prompt
from vlmtune.models.loading import ModelConfig, load_model


def _msg(role, text, image=False):
    return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def paligemma():
    return load_model(ModelConfig(name="p", hf_model_id="tiny:paligemma", torch_dtype="float32"))


@pytest.fixture(scope="module")
def blip2():
    return load_model(ModelConfig(name="b", hf_model_id="tiny:blip2", torch_dtype="float32"))


def _image(shapes_dir, i=0):
    return str(sorted((shapes_dir / "images").glob("*.png"))[i])


def test_paligemma_training_inputs_equal_the_processors_suffix_encoding(paligemma, shapes_dir):
    path = _image(shapes_dir)
    enc = Encoder(paligemma.processor, paligemma.family)
    f = enc.encode(Sample("s", [_msg("user", "What color is the shape?", True), _msg("assistant", "red")], [path])).features
    ref = paligemma.processor(text=["<image>What color is the shape?"], images=[load_image(path, "x")], suffix=["red"], return_tensors="pt")
    for k in ("input_ids", "token_type_ids", "labels"):
        assert torch.equal(f[k], ref[k][0]), k


def test_paligemma_multi_turn_answers_are_suffix_and_never_see_their_future(paligemma, shapes_dir):
    enc = Encoder(paligemma.processor, paligemma.family)
    s = Sample("m", [_msg("user", "What shape is it?", True), _msg("assistant", "a blue circle"),
                     _msg("user", "Is it small?"), _msg("assistant", "yes")], [_image(shapes_dir, 1)])
    f = enc.encode(s).features
    types, labels = f["token_type_ids"], f["labels"]
    sup = (labels != IGNORE_INDEX).nonzero().flatten()
    # one prefix (image, <bos>, first question): everything from the first answer on is causal
    assert types[: sup[0]].eq(0).all() and types[sup[0]:].eq(1).all()
    model = paligemma.model.eval()
    changed = f["input_ids"].clone()
    changed[sup[0] + 1] = (changed[sup[0] + 1] + 5) % 900

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=ids[None], attention_mask=f["attention_mask"][None], pixel_values=f["pixel_values"], token_type_ids=types[None]).logits[0]

    # the logits that predict answer token 2 must not depend on answer token 2
    assert torch.equal(logits(f["input_ids"])[sup[0]], logits(changed)[sup[0]])
    # a generation prompt with that history types it the same way
    prompt = build_prompt(enc, s, PromptStyle())
    p = enc.encode_prompts([prompt], [[load_image(s.images[0], "x")]])
    n = p["input_ids"].shape[1]
    assert torch.equal(p["input_ids"][0], f["input_ids"][:n]) and torch.equal(p["token_type_ids"][0], types[:n])
    assert "labels" not in p and "offset_mapping" not in p


def test_blip2_query_tokens_are_never_supervised_and_answers_end_with_newline(blip2, shapes_dir):
    enc = Encoder(blip2.processor, blip2.family)
    s = Sample("b", [_msg("user", "What shape is it?", True), _msg("assistant", "circle")], [_image(shapes_dir)])
    e = enc.encode(s)
    ids, labels = e.features["input_ids"], e.features["labels"]
    n_query = blip2.model.config.num_query_tokens
    assert e.n_image_tokens == n_query and ids[:n_query].eq(enc.image_token_id).all()
    assert labels[ids == enc.image_token_id].eq(IGNORE_INDEX).all()
    assert enc.supervised_segments(e) == [" circle\n"]
    newline = blip2.processor.tokenizer.encode("\n", add_special_tokens=False)
    assert newline[0] in _end_token_ids(enc)
    # a plain prompt gets no image text: the processor prepends the query tokens itself
    plain = build_prompt(enc, s, PromptStyle(template="Question: {query} Answer:"))
    assert plain == "Question: What shape is it? Answer:"
    p = enc.encode_prompts([plain], [[load_image(s.images[0], "x")]])
    assert int((p["input_ids"] == enc.image_token_id).sum()) == n_query

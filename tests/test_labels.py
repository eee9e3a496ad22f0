"""Loss only on assistant tokens: for every family, the supervised tokens decode to exactly
the response(s) followed by the family's end-of-turn token; never system, user, image or pad."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import TINY_FAMILIES
from vlmtune.config import ModelConfig
from vlmtune.data.collate import IGNORE_INDEX, Collator, Encoder
from vlmtune.data.sources import Sample
from vlmtune.models.loading import load_processor_only

IMG = Image.new("RGB", (60, 44), (200, 30, 30))


def _msg(role, *parts):
    return {"role": role, "content": [{"type": "image"} if p is IMG else {"type": "text", "text": p} for p in parts]}


SINGLE = Sample("single", [_msg("user", IMG, "What color is the shape?"), _msg("assistant", "red circle")])
MULTI = Sample("multi", [
    _msg("system", "Answer in one word."),
    _msg("user", IMG, "What color?"), _msg("assistant", "red"),
    _msg("user", "And the shape?"), _msg("assistant", "a small circle"),
])


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def encoder(request):
    proc, fam = load_processor_only(ModelConfig(name="m", hf_model_id=f"tiny:{request.param}"))
    return Encoder(proc, fam)


def _expected(enc, responses):
    # LLaVA's template writes "ASSISTANT: " before the answer and byte-level BPE glues that
    # space to the answer's first token (as sentencepiece's "▁red" does in the real model),
    # so each supervised answer there starts with the space that belongs to its first token.
    lead = " " if enc.family.name == "llava" else ""
    return "".join(lead + r + enc.end_of_turn for r in responses)


@pytest.mark.parametrize("sample, responses", [(SINGLE, ["red circle"]), (MULTI, ["red", "a small circle"])])
def test_supervised_text_is_answers_plus_end_of_turn(encoder, sample, responses):
    e = encoder.encode(sample, [IMG])
    assert encoder.supervised_text(e) == _expected(encoder, responses)
    n = sum(len(encoder.tokenizer(_expected(encoder, [r]), add_special_tokens=False)["input_ids"]) for r in responses)
    assert e.n_supervised == n


def test_image_and_prompt_tokens_are_never_supervised(encoder):
    e = encoder.encode(MULTI, [IMG])
    ids, labels = e.features["input_ids"], e.features["labels"]
    assert e.n_image_tokens > 0
    assert not bool(((ids == encoder.image_token_id) & (labels != IGNORE_INDEX)).any())
    # The text before the first answer is all unsupervised.
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    prompt = encoder.tokenizer.decode(ids[:first].tolist())
    assert "What color?" in prompt and "Answer in one word." in prompt
    assert bool((labels[:first] == IGNORE_INDEX).all())
    # Labels equal input ids wherever they are set (no shift here: the model shifts).
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])


def test_padding_is_never_supervised_and_images_concatenate(encoder):
    feats = [encoder.encode(SINGLE, [IMG]).features, encoder.encode(MULTI, [IMG]).features]
    batch = Collator(encoder.tokenizer.pad_token_id)(feats)
    n0 = feats[0]["input_ids"].shape[0]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, feats[1]["input_ids"].shape[0])
    assert bool((batch["labels"][0, n0:] == IGNORE_INDEX).all()) and bool((batch["attention_mask"][0, n0:] == 0).all())
    assert batch["pixel_values"].shape[0] == feats[0]["pixel_values"].shape[0] * 2


def test_generation_prompt_matches_training_text_up_to_the_answer(encoder):
    prompt = encoder.render_prompt(MULTI.prompt_messages())
    full, spans = encoder.render_with_spans(MULTI.messages)
    # What the model sees before generating its last answer is what it saw in training
    # (earlier answers with their end-of-turn token), up to template whitespace.
    assert full.startswith(prompt)
    assert full[len(prompt): spans[-1][0]].strip() == ""
    assert full[spans[-1][0]:].startswith("a small circle" + encoder.end_of_turn)


def test_overlong_samples_are_skipped_and_counted_or_refused(encoder):
    from vlmtune.data.collate import SFTDataset
    from vlmtune.errors import UserError

    long = Sample("long", [_msg("user", IMG, "What color? " * 40), _msg("assistant", "red")], images=[])
    short_len = encoder.encode(SINGLE, [IMG]).n_tokens
    samples = [Sample(s.id, s.messages, images=[]) for s in (SINGLE,)] + [long]
    encoder_encode = encoder.encode
    encoder.encode = lambda s, images=None: encoder_encode(s, [IMG])  # in-memory image for this test
    try:
        ds = SFTDataset(samples, encoder, max_length=short_len + 5, on_overlength="skip")
        assert len(ds) == 1 and ds.skipped[0][0] == "long"
        with pytest.raises(UserError, match="long: .* tokens .* > data.max_length"):
            SFTDataset(samples, encoder, max_length=short_len + 5, on_overlength="error")
    finally:
        encoder.encode = encoder_encode

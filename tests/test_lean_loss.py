"""The lean loss (issue #15, train/loss.py): the loss at supervised positions only, a chunk of
logits at a time, inside the model's forward.

- every family: the same loss (1e-6 relative) and the same gradients as the full-logits loss
  on a padded batch with assistant-only labels, divided by a step-wide `num_items_in_batch`;
- softcapping is applied exactly when the model applies it (PaliGemma yes, Gemma3's
  conditional-generation class no, whatever the config says); any other post-processing of
  the logits is an error; under accelerate-style mixed precision the head keeps the
  forward's autocast (bf16 logits, as the full path);
- through the Trainer: the training loss and the eval loss (`evaluate()`) equal the
  full-logits path's; a head that trains through peft falls back (one line) and still gets
  the right loss. (The cross-process scaling is checked by tests/test_distributed.py: two
  processes equal one, DDP and FSDP.);
- peak *allocated* memory (tracked per tensor storage, CPU has no allocator statistics) is
  far below the full-logits path on a large-vocabulary model, no single allocation exceeds
  one chunk's logits, and only supervised positions are projected (total bytes allocated).
"""

from __future__ import annotations

import logging
import statistics
import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vlmtune.data.collate import Collator, Encoder, SFTDataset
from vlmtune.data.sources import Sample
from vlmtune.models.families import FAMILIES, family_names
from vlmtune.models.loading import ModelConfig, load_model
from vlmtune.train.loss import lean_forward, lean_loss_unsupported, token_mean_loss

FAMILY_NAMES = [f for f in family_names() if FAMILIES[f].build_tiny is not None]
EXTRA = 7  # num_items_in_batch = this batch's supervised tokens + EXTRA (other micro-batches/ranks of the step)


def _msg(role: str, text: str, image: bool = False) -> dict[str, Any]:
    return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _samples(shapes_dir) -> list[Sample]:
    img = [str(p) for p in sorted((shapes_dir / "images").glob("*.png"))[:3]]
    return [
        Sample("single", [_msg("user", "What color is the shape?", True), _msg("assistant", "red")], [img[0]]),
        Sample("multi", [_msg("user", "What shape is it?", True), _msg("assistant", "a blue circle in the middle"),
                         _msg("user", "Is it small?"), _msg("assistant", "yes")], [img[1]]),
        Sample("third", [_msg("user", "Describe the image.", True), _msg("assistant", "a blue square")], [img[2]]),
    ]


def _load(fam: str):
    return load_model(ModelConfig(name=fam, hf_model_id=f"tiny:{fam}", torch_dtype="float32", min_pixels=3136, max_pixels=3136))


def _batch(lm, shapes_dir) -> dict[str, torch.Tensor]:
    """Three samples of different lengths, padded, assistant-only labels."""
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    return Collator(lm.processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])


def _full(model, batch) -> tuple[torch.Tensor, int]:
    """Today's path: full logits -> token_mean_loss / (N + EXTRA)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = int((batch["labels"][:, 1:] != -100).sum())
    return token_mean_loss(model(**inputs), batch["labels"], num_items_in_batch=torch.tensor(n + EXTRA)), n


def _lean(model, batch, chunk: int) -> tuple[torch.Tensor, int]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss_sum, out, n = lean_forward(model, model, inputs, batch["labels"], chunk)
    assert "logits" not in out or out["logits"] is None
    return loss_sum / torch.tensor(n + EXTRA), n


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(full: torch.Tensor, lean: torch.Tensor, g_full: dict[str, torch.Tensor], g_lean: dict[str, torch.Tensor], what: str) -> None:
    assert abs(lean.item() - full.item()) <= 1e-6 * abs(full.item()), (what, full.item(), lean.item())
    assert set(g_full) == set(g_lean), (what, set(g_full) ^ set(g_lean))
    scales = {name: float(g.abs().max()) for name, g in g_full.items()}
    typical = statistics.median(scales.values())  # the median: BLIP-2's tiny query_tokens gradient is ~1e17
    compared = 0
    for name, g in g_full.items():
        err = float((g_lean[name] - g).abs().max())
        # a gradient that is 0 in theory (attention k_proj.bias; layer norms the tiny BLIP-2
        # saturates) is rounding noise, whose relative error means nothing: an absolute bound
        if scales[name] <= 1e-6 * typical:
            assert err <= 1e-5 * typical, (what, name, err)
            continue
        assert err <= 1e-5 * scales[name], f"{what}: {name} gradient differs by {err / scales[name]:.3g} relative"
        compared += 1
    assert compared > 10, what  # not vacuous


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_lean_loss_and_gradients_equal_the_full_logits_loss(fam, shapes_dir):
    lm = _load(fam)
    model = lm.model.eval()  # no dropout (BLIP-2's Q-Former has some); gradients flow all the same
    batch = _batch(lm, shapes_dir)
    full, n = _full(model, batch)
    g_full = _grads(model, full)
    lean, n_lean = _lean(model, batch, chunk=4)  # several chunks
    assert n_lean == n and n > 8
    _assert_same(full, lean, g_full, _grads(model, lean), fam)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head is itself again


@pytest.mark.parametrize("fam, applied", [("paligemma", True), ("gemma3", False)])
def test_softcapping_is_applied_exactly_when_the_model_applies_it(fam, applied, shapes_dir):
    """PaliGemma caps its logits with the text config's final_logit_softcapping;
    Gemma3ForConditionalGeneration carries the same key and does not. A cap of 0.5 bites on
    the tiny models' logits (std ~0.5), so applying it wrongly, or not, changes the loss."""
    lm = _load(fam)
    model = lm.model.eval()
    model.config.get_text_config().final_logit_softcapping = 0.5
    batch = _batch(lm, shapes_dir)
    full, _ = _full(model, batch)
    g_full = _grads(model, full)
    lean, _ = _lean(model, batch, chunk=5)
    _assert_same(full, lean, g_full, _grads(model, lean), fam)
    model.config.get_text_config().final_logit_softcapping = None
    uncapped, _ = _full(model, batch)
    assert (abs(uncapped.item() - full.item()) > 1e-3) == applied


def test_softcapping_is_found_once_per_model_and_cap(shapes_dir, monkeypatch):
    """The check (a comparison, a device sync) runs on a model's first lean forward only; a
    changed final_logit_softcapping is a new candidate and is checked again."""
    from vlmtune.train import loss as loss_mod

    lm = _load("paligemma")
    model = lm.model.eval()
    text = model.config.get_text_config()
    text.final_logit_softcapping = 0.5
    batch = _batch(lm, shapes_dir)
    calls = []
    real = loss_mod._LeanForward._applied_softcap
    monkeypatch.setattr(loss_mod._LeanForward, "_applied_softcap", lambda self, out: calls.append(1) or real(self, out))
    with torch.no_grad():
        capped = [_lean(model, batch, 4)[0].item() for _ in range(3)]
        text.final_logit_softcapping = None
        uncapped = _lean(model, batch, 4)[0].item()
        full_uncapped = _full(model, batch)[0].item()
    assert len(calls) == 2  # once for cap 0.5, once for no cap
    assert capped[0] == capped[1] == capped[2]
    assert abs(uncapped - full_uncapped) <= 1e-6 * full_uncapped and abs(uncapped - capped[0]) > 1e-3


def test_mixed_precision_head_runs_under_the_forwards_autocast(shapes_dir):
    """accelerate's mixed precision wraps the model's *forward* in autocast; the hook runs
    after that forward returned, so it must restore the head's autocast state: bf16 logits,
    as the full path (fp32 logits would be another, if better, loss: 3e-4 apart here)."""
    lm = _load("qwen2_5_vl")
    model = lm.model.eval()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # as accelerate.prepare does
    batch = _batch(lm, shapes_dir)
    with torch.no_grad():
        full, _ = _full(model, batch)
        lean, _ = _lean(model, batch, chunk=4)
    assert abs(lean.item() - full.item()) <= 1e-6 * full.item(), (full.item(), lean.item())


def test_unknown_logit_post_processing_is_an_error_not_a_different_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = Scaled(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(RuntimeError, match="post-processes its logits"):
        lean_forward(model, model, {"input_ids": ids}, ids, 4)
    assert "forward" not in model.lm_head.__dict__


# ---------------------------------------------------------------------------------------
# Through the Trainer


def _trainer(model, tmp_path, **kw):
    from transformers import TrainingArguments

    from vlmtune.train.trainer import VlmTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, remove_unused_columns=False,
                             label_names=["labels"], average_tokens_across_devices=True, per_device_eval_batch_size=2)
    return VlmTrainer(model=model, args=args, **kw)


@pytest.fixture(scope="module")
def qwen(shapes_dir):
    lm = _load("qwen2_5_vl")
    return lm, _batch(lm, shapes_dir)


def test_trainer_training_and_eval_loss_equal_the_full_logits_path(qwen, shapes_dir, tmp_path, caplog):
    lm, batch = qwen
    model = lm.model.train()
    ds = SFTDataset(_samples(shapes_dir), Encoder(lm.processor, lm.family), 4096)
    kw = {"eval_dataset": ds, "data_collator": Collator(lm.processor.tokenizer.pad_token_id)}
    lean, full = _trainer(model, tmp_path / "a", loss_chunk_size=3, **kw), _trainer(model, tmp_path / "b", lean_loss=False, **kw)
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + EXTRA)
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        l_lean = lean.compute_loss(model, dict(batch), num_items_in_batch=n)
    assert not [r for r in caplog.records if "lean loss off" in r.message]
    l_full = full.compute_loss(model, dict(batch), num_items_in_batch=n)
    assert abs(l_lean.item() - l_full.item()) <= 1e-6 * l_full.item()
    # evaluation (prediction_step -> compute_loss(return_outputs=True), per-batch counts,
    # outputs gathered over batches of 2 + 1): the same eval loss
    e_lean, e_full = lean.evaluate()["eval_loss"], full.evaluate()["eval_loss"]
    assert abs(e_lean - e_full) <= 1e-6 * e_full, (e_lean, e_full)
    assert "forward" not in model.get_output_embeddings().__dict__


def test_a_head_that_trains_through_peft_falls_back_with_one_line_and_the_right_loss(qwen, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    lm, batch = qwen
    model = get_peft_model(_load("qwen2_5_vl").model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "not a plain Linear" in lean_loss_unsupported(model)
    model.train()
    lean = _trainer(model, tmp_path)
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        losses = [lean.compute_loss(model, dict(batch), num_items_in_batch=n) for _ in range(2)]
    assert len([r for r in caplog.records if "lean loss off" in r.message]) == 1
    ref = model(**batch).loss  # the model's own loss: batch mean = sum / n here
    assert all(abs(l.item() - ref.item()) <= 1e-6 * ref.item() for l in losses)


# ---------------------------------------------------------------------------------------
# Memory


class AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage allocated by the ops run under it (forward and backward; CPU
    has no allocator statistics): each new output storage counts until it is freed (a weakref
    finalizer on the storage; torch keeps a storage's Python object alive as long as the
    storage). Records the peak, the largest single storage and the total ever allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = self.largest = self.total = 0
        self.sizes: list[int] = []  # every allocation, in order

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live or key in inputs:
                continue
            self.live[key] = size
            self.sizes.append(size)
            self.current += size
            self.total += size
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, size)
            weakref.finalize(storage, self._freed, key)
        return out


def test_lean_loss_peak_memory_is_far_below_the_full_logits_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    V, B, T, ANSWER, CHUNK = 65536, 2, 128, 24, 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).train()
    model.model.embed_tokens.requires_grad_(False)  # as under LoRA: no [V, H] gradient in either path
    model.lm_head.requires_grad_(False)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -16:] = 0  # a padded row
    labels = torch.full((B, T), -100)
    labels[0, -ANSWER:] = ids[0, -ANSWER:]
    labels[1, -16 - ANSWER:-16] = ids[1, -16 - ANSWER:-16]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits_bytes = B * T * V * 4  # fp32 logits of every position

    def run(fn) -> AllocationTracker:
        with AllocationTracker() as tr:
            loss, _ = fn()
            loss.backward()
            del loss
        model.zero_grad(set_to_none=True)
        return tr

    full = run(lambda: _full(model, batch))
    lean = run(lambda: _lean(model, batch, CHUNK))
    chunk_bytes = CHUNK * V * 4
    print(f"\nfull: peak {full.peak / 2**20:.1f} MiB, total {full.total / 2**20:.1f} MiB, largest {full.largest / 2**20:.1f} MiB; "
          f"lean: peak {lean.peak / 2**20:.1f} MiB, total {lean.total / 2**20:.1f} MiB, largest {lean.largest / 2**20:.1f} MiB; "
          f"all logits {logits_bytes / 2**20:.1f} MiB, one chunk {chunk_bytes / 2**20:.1f} MiB")
    assert full.peak >= logits_bytes  # the tracker sees the full logits
    assert lean.peak < 0.1 * full.peak  # measured 0.07; with the chunk size ignored 0.19
    assert lean.largest <= chunk_bytes  # never more than one chunk of logits in one tensor
    # only supervised positions are projected: every chunk allocates its logits a few times
    # (logits, logsumexp, softmax gradient), about 2 x ANSWER of the B x T positions
    assert lean.total < 0.5 * full.total


def _tiny_llama(V: int, H: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)).train()


def test_a_trained_head_gets_one_weight_gradient_however_many_chunks():
    """Full fine-tuning trains the head [V, H]. Its gradient is one buffer that every chunk
    adds into (computed in the forward, as Liger does), not a [V, H] gradient per chunk plus
    their running sum (autograd over checkpointed chunks: 5 of them for 3 chunks here; the
    bench's 152k x 256 head makes each 145 MiB). Same loss and head gradient as full logits."""
    V, H, T, CHUNK = 65536, 32, 64, 16
    model = _tiny_llama(V, H, tied=False)
    model.model.embed_tokens.requires_grad_(False)  # only the head's [V, H] gradient is in play
    ids = torch.randint(0, V, (1, T))
    labels = torch.full((1, T), -100)
    labels[0, -3 * CHUNK:] = ids[0, -3 * CHUNK:]  # 3 chunks of supervised positions (the last one shifted out)
    batch = {"input_ids": ids, "labels": labels}
    full, _ = _full(model, batch)
    g_full = _grads(model, full)
    with AllocationTracker() as tr:
        lean, _ = _lean(model, batch, CHUNK)
        model.zero_grad(set_to_none=True)
        lean.backward()
    weight_sized = [s for s in tr.sizes if s >= V * H * 4]
    assert len(weight_sized) == 1, [s / 2**20 for s in weight_sized]
    assert abs(lean.item() - full.item()) <= 1e-6 * full.item()
    g_lean = model.lm_head.weight.grad
    assert float((g_lean - g_full["lm_head.weight"]).abs().max()) <= 1e-5 * float(g_full["lm_head.weight"].abs().max())


def test_gradients_under_mixed_precision_match_the_full_logits_path():
    """accelerate-style bf16 autocast with gradients: the chunked path casts as autocast does
    (bf16 matmuls, fp32 softmax, the weight's gradient accumulated in its own fp32), so its
    gradients match the full path's to bf16 rounding; a second backward through the same loss
    is an error, not a silently doubled gradient."""
    V, H, T = 4096, 32, 40
    model = _tiny_llama(V, H, tied=True)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    ids = torch.randint(0, V, (2, T))
    labels = ids.clone()
    labels[:, : T // 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    full, _ = _full(model, batch)
    g_full = _grads(model, full)
    lean, _ = _lean(model, batch, 8)
    assert abs(lean.item() - full.item()) <= 1e-6 * full.item()
    g_lean = _grads(model, lean)
    assert set(g_lean) == set(g_full)
    for name, g in g_full.items():
        assert g_lean[name].dtype == g.dtype == torch.float32
        scale = float(g.abs().max())
        assert float((g_lean[name] - g).abs().max()) <= 2e-2 * scale, name
    lean, _ = _lean(model, batch, 8)
    lean.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        lean.backward()

"""PaliGemma (google/paligemma-*, paligemma2-*): SigLIP vision tower `model.vision_tower`,
linear projector `model.multi_modal_projector`, Gemma LLM `model.language_model` + `lm_head`.

PaliGemma is a prefix-LM: `<image>*N <bos>prefix\\n` is read bidirectionally and the suffix
(the answer, then `<eos>`) causally. transformers builds that mask from `token_type_ids`
(0 = prefix, 1 = suffix; PaliGemmaModel groups every 0 into one bidirectional block), and
the processor sets them only when the answer comes as `suffix=`. Without them everything is
prefix and an answer token sees the tokens it must predict.

Quirks handled here:
- No chat template in the checkpoints: the family's renders exactly the text
  `PaliGemmaProcessor(text="<image>q", suffix="a")` builds, `<image>*n<bos>q\\na<eos>`, so the
  supervised tokens are the answer + `<eos>` (the end of turn).
- The processor rewrites every text (BOS after the last `<image>`, "\\n" at the end) without
  reporting it in its offsets. `process_paligemma` hands it the text minus those insertions,
  so what it builds is exactly the rendered text and the offsets stay valid; a training
  text already ends in `<eos>`, so the "\\n" it appends there is dropped.
- token_type_ids: a training text is 1 from the first answer on, as the processor's
  `suffix=` makes it; a one-turn generation prompt is all prefix (0), as the processor makes
  it (generate() types each new token 1).
- Multi-turn: PaliGemma has one prefix. The first user turn (and a system message before
  it) is the bidirectional prefix; later turns continue the causal suffix:
  `<image>*n<bos>q1\\na1<eos>q2\\na2<eos>`, every answer + `<eos>` supervised. Later turns
  cannot be prefix too: all 0-typed tokens form one block, so a later question would let
  the first prefix see the first answer. Images go in the first user turn only. A
  generation prompt with earlier answers marks its suffix from the first "\\n" after
  `<bos>` (the prefix's end when the first question is one line).
- SigLIP's pooling `head` (present when vision_use_head; the hub checkpoints set it false)
  is computed but never read: frozen. post_layernorm is used (last_hidden_state).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from . import LLM_TARGETS, Family, PackingContext, register

# The first user turn's images, then <bos>; every user turn ends with "\n", every answer
# with <eos>; a system message leads the prefix. add_generation_prompt adds nothing: the
# "\n" after a question is PaliGemma's cue to answer.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(user_seen=false, n_images=0) -%}"
    "{%- for message in messages | selectattr('role', 'equalto', 'user') -%}{%- if loop.first and message['content'] is not string -%}"
    "{%- set ns.n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}{%- endfor -%}"
    "{%- if messages -%}{{ '<image>' * ns.n_images + '<bos>' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'user' and not ns.user_seen -%}{%- set ns.user_seen = true -%}{{ text + '\\n' }}"
    "{%- elif n_images -%}{{ raise_exception('PaliGemma takes images in the first user turn only') }}"
    "{%- elif message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ text + '\\n' }}"
    "{%- else -%}{{ text + '<eos>' }}{%- endif -%}"
    "{%- endfor -%}"
)


def unused_siglip_head(model: nn.Module) -> tuple[str, ...]:
    """SigLIP's attention-pooling head: its output (pooler_output) is replaced by the
    projected patch features, so it never gets a gradient."""
    return ("model.vision_tower.head.",) if getattr(model.model.vision_tower, "head", None) is not None else ()


def process_paligemma(processor: Any, kwargs: dict[str, Any], spans: Optional[list] = None) -> Any:
    """PaliGemmaProcessor's output for texts rendered by PALIGEMMA_CHAT_TEMPLATE, offsets
    relative to those texts, token_type_ids 0 for the prefix and 1 from the first answer on.

    Args:
        kwargs: the processor call (`text`, `images`, ...).
        spans: each text's supervised character spans (training), or None (prompts).
    """
    tok = processor.tokenizer
    bos, image = tok.bos_token, processor.image_token
    texts: list[str] = list(kwargs["text"])
    sent, appended = [], []
    for t in texts:
        cut = t.rfind(image) + len(image) if image in t else -1
        if cut >= 0 and t.startswith(bos, cut):
            t = t[:cut] + t[cut + len(bos):]  # the processor puts BOS back right there
        appended.append(not t.endswith("\n"))
        sent.append(t[:-1] if t.endswith("\n") else t)  # ... and "\n" back at the end
    call = {**kwargs, "text": sent, "return_offsets_mapping": True, "return_text_replacement_offsets": True}
    out = processor(**call)
    out.pop("labels", None)  # vlmtune labels answers itself; generate() must not get labels
    if spans is not None and any(appended):
        # A training text ends with <eos>: the "\n" the processor appends there is not ours.
        if len(texts) != 1 or out["input_ids"][0, -1].item() != tok.encode("\n", add_special_tokens=False)[-1]:
            raise RuntimeError("PaliGemma: unexpected processor output after the answer; please report it")
        for k in ("input_ids", "attention_mask", "token_type_ids", "offset_mapping"):
            if k in out:
                out[k] = out[k][:, :-1]
    types = torch.zeros_like(out["input_ids"])
    for i, t in enumerate(texts):
        if spans is not None:
            start = spans[i][0][0] if spans[i] else None
        elif tok.eos_token in t:  # a prompt with earlier answers: they are suffix already
            start = t.find("\n", t.find(bos) + 1) + 1 if bos in t else None
        else:
            start = None  # a prompt is all prefix, as the processor makes it
        if start is None:
            continue
        grown = sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                    for r in out["text_replacement_offsets"][i] if r["span"][1] <= start)
        # end > boundary: a token straddling it (the processor never makes one, it tokenizes
        # prefix and suffix apart) holds answer text and must not see the rest of the answer
        types[i] = (out["offset_mapping"][i][:, 1] > start + grown).long()
    out["token_type_ids"] = types * out["attention_mask"]
    for key, asked in (("offset_mapping", "return_offsets_mapping"), ("text_replacement_offsets", "return_text_replacement_offsets")):
        if not kwargs.get(asked):
            out.pop(key, None)  # generate() takes only model inputs
    return out


def packed_positions(context: PackingContext, features: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Positions of a packed row: PaliGemma counts them from 1 (its forward adds 1 when it
    makes them itself), restarting at each sample. transformers separates the samples by
    them and applies each sample's own prefix block (token_type_ids) within it."""
    return {"position_ids": torch.cat([torch.arange(1, n + 1) for n in lengths])[None]}


def build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    from ..tiny import train_tokenizer

    # Gemma's special tokens in Gemma's order; no BOS added on encode (the processor writes it).
    tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token = "<pad>", "<eos>", "<bos>", "<unk>"
    image_size, patch = 56, 14
    n_image = (image_size // patch) ** 2
    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, image_seq_length=n_image)
    proc = PaliGemmaProcessor(ip, tok)  # adds <image> and the <locNNNN>/<segNNN> tokens
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<image>")}
    cfg = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=image_size, patch_size=patch,
            # The hub checkpoints drop SigLIP's pooling head; the tiny keeps it so the tests
            # prove a head, when a config has one, is frozen (it never gets a gradient).
            vision_use_head=True,
        ),
        text_config=dict(
            model_type="gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
            pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
            # width 64 with the usual 0.02 init gives near-uniform logits (see qwen.py)
            initializer_range=0.1,
        ),
        image_token_index=ids["<image>"],
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tok),
    )
    return PaliGemmaForConditionalGeneration(cfg), proc


def _paligemma_processor() -> type:
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor


register(
    Family(
        name="paligemma",
        hf_model_types=("paligemma",),
        aliases=("paligemma2", "pali-gemma", "pali_gemma"),
        parts={"vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector",), "llm": ("model.language_model", "lm_head")},
        lora_targets={"vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "projector": None, "llm": LLM_TARGETS},
        end_of_turn="<eos>",
        processor_class=_paligemma_processor,
        unused_by_config=unused_siglip_head,
        image_markup="<image>",
        chat_template=PALIGEMMA_CHAT_TEMPLATE,
        process=process_paligemma,
        build_tiny=build_paligemma,
        packing="position_ids",
        packed_inputs=packed_positions,
    )
)

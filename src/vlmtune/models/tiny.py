"""Offline tiny models: `tiny:<family>`.

Each builder makes a deterministic random-init model with the *real* transformers class
(hidden 64, 2 layers, vision depth 2), a byte-level BPE tokenizer trained here on a small
built-in corpus with the family's special tokens and chat template, and the family's real
processor. The result is saved with `save_pretrained` into the vlmtune cache and then loaded
back through the same loading code as a hub id or local directory, so tests and the demo
exercise exactly what users run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TINY_PREFIX = "tiny:"
TINY_VERSION = 3  # bump when a builder changes: cached models are keyed by it

# A small English corpus for the tokenizer: common words, colours, shapes, positions, numbers
# and question words, so short answers in tests and the demo are a few tokens each.
_WORDS = """
the a an is are was were be been of and or to in on at by for with from as that this these those it its
what which where who how many much color colour shape size position image picture photo object objects
red green blue yellow orange purple pink brown black white gray grey cyan magenta
circle square triangle rectangle star cross diamond ellipse line dot
left right top bottom center middle upper lower corner small large big tiny medium
one two three four five six seven eight nine ten zero yes no true false
there here has have shown show describe answer question word only single
you helpful assistant user system please short brief background noisy noise
cat dog car tree house person man woman child bird horse boat plane train bus street
sky water grass road building table chair food plate cup bottle phone book screen
""".split()


def _corpus() -> list[str]:
    lines = []
    for i, w in enumerate(_WORDS):
        lines.append(" ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(12)))
        lines.append(f"What {w} is the shape? {w}. The answer is {w}.")
        lines.append(w.capitalize() + " " + w + ", " + w + "?")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024 : ; - ( ) [ ] \" ' ! ? . ,")
    return lines * 4


def train_tokenizer(special_tokens: list[str], vocab_size: int = 1024, bos: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the built-in corpus.

    `special_tokens` get the lowest ids in order; `bos` (if given) is prepended on encode,
    as Llama-family tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def builders() -> dict[str, Callable]:
    """family name -> tiny builder, for every family that has one."""
    from .families import FAMILIES

    return {name: f.build_tiny for name, f in FAMILIES.items() if f.build_tiny is not None}


def is_tiny(model_id: str) -> bool:
    return model_id.startswith(TINY_PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_HOME") or Path.home() / ".cache" / "vlmtune")


def tiny_dir(model_id: str) -> Path:
    """Build (once) and return the local directory of `tiny:<family>`."""
    from ..errors import UserError

    family = model_id[len(TINY_PREFIX):]
    known = builders()
    if family not in known:
        raise UserError(f"model id {model_id!r}", f"no tiny model for family {family!r}", f"use one of {', '.join('tiny:' + k for k in sorted(known))}")
    out = cache_root() / "tiny" / f"{family}-v{TINY_VERSION}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename: a crash or a concurrent builder never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=out.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, proc = known[family]()
        eot = proc.tokenizer.eos_token_id
        model.generation_config.eos_token_id = eot
        model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
        model.generation_config.bos_token_id = proc.tokenizer.bos_token_id
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

"""`vlmtune chat RUN_DIR|MODEL --image PATH ["question"]`: ask a model about an image.

With a question it prints one answer; without, it reads questions line by line (`exit`,
`quit` or end of input stops) and keeps the conversation: the image(s) sit in the first user
turn, and each later question follows the earlier answers as one multi-turn conversation.

The prompt and the decoding are evaluation's own: every turn is a `Sample` run through
`generate.generate` (`build_prompt`: the model's chat template, the run's system message;
the run's `generation_*` settings), so a question asked here about a test image gets the
answer `vlmtune evaluate` predicted for it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Optional

from ..data.images import ImagePolicy, is_remote, load_image
from ..data.sources import Sample
from ..errors import UserError
from . import standalone as S
from .generate import GenerationSettings, PromptStyle, generate

EXIT_WORDS = ("exit", "quit")
CHAT_IMAGE_POLICY = ImagePolicy(allow_remote=True)
"""The user names each image on the command line: a URL there is fetched (size-capped)."""


def load_target(target: str, weights: str = "auto", model_type: Optional[str] = None, lora_path: Optional[str] = None,
                dtype: str = "auto", trust_remote_code: bool = False, min_pixels: Optional[int] = None,
                max_pixels: Optional[int] = None) -> S.EvalModel:
    """A run directory (or a run name under results/*/): its model, config and settings; else a
    model (local folder, hub id or tiny:<family>), optionally with a LoRA adapter."""
    p = Path(target)
    is_run = (p / "config.yaml").is_file() and not (p / "config.json").is_file()
    if not is_run and not p.exists() and "/" not in target and ":" not in target:
        try:
            p, is_run = S.find_run_dir(target, "chat"), True
        except UserError:
            pass
    if is_run:
        given = [f for f, v in (("--lora-path", lora_path), ("--model-type", model_type), ("--min-pixels", min_pixels), ("--max-pixels", max_pixels),
                                ("--dtype", dtype != "auto"), ("--trust-remote-code", trust_remote_code)) if v]
        if given:
            raise UserError(given[0], "a run's config.yaml already sets its model", "drop the flag (it applies to a model id), or edit the run's config")
        return S.load_run(p, weights)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError("chat", f"{target} is neither a run directory (config.yaml) nor a model folder (config.json)",
                        "pass the folder `vlmtune train` made, an exported model, or a model id")
    if weights != "auto":
        raise UserError("--weights", "only a run directory has final/ and lora_adapter/", "drop --weights")
    return S.load_model_id(target, lora_path, model_type, dtype, trust_remote_code, min_pixels, max_pixels)


def check_images(paths: list[str]) -> list[str]:
    """Every `--image`, decoded once now: a missing or broken file is one line before any question."""
    out = []
    for raw in paths:
        ref = raw if is_remote(raw) else str(Path(raw).expanduser().resolve())
        if not is_remote(raw) and not Path(ref).is_file():
            raise UserError("--image", f"{raw} not found", "pass an image file (PNG, JPEG, ...) or an http(s) URL")
        load_image(ref, f"--image {raw}", CHAT_IMAGE_POLICY)
        out.append(ref)
    return out


class Chat:
    """One conversation with a model about fixed images."""

    def __init__(self, em: S.EvalModel, images: list[str], settings: GenerationSettings, style: PromptStyle):
        self.em, self.images, self.settings, self.style = em, images, settings, style
        self.messages: list[dict] = []

    def ask(self, question: str) -> str:
        content = [{"type": "text", "text": question}]
        if not self.messages:
            content = [{"type": "image"} for _ in self.images] + content
        turn = [*self.messages, {"role": "user", "content": content}]
        sample = Sample(id=f"chat:{len(turn) // 2 + 1}", messages=turn, images=list(self.images), image_policy=CHAT_IMAGE_POLICY)
        answer = generate(self.em.model, self.em.encoder, [sample], 1, self.settings, self.style)[0]["prediction"]
        self.messages = [*turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer


def interactive(chat: Chat, stdin: IO[str], stdout: IO[str], banner: Optional[str] = None) -> int:
    """Questions line by line until `exit`/`quit`/end of input; the number answered."""
    tty = stdin.isatty()
    if banner and tty:
        print(banner, file=sys.stderr)
    n = 0
    while True:
        if tty:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                break
        else:
            line = stdin.readline()
            if not line:
                break
        q = line.strip()
        if not q:
            continue
        if q.lower() in EXIT_WORDS:
            break
        print(chat.ask(q), file=stdout, flush=True)
        n += 1
    return n

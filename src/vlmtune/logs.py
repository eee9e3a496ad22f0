"""How a vlmtune process logs: one line per message on stderr, library noise quieted unless
`debug`, and under a launcher (torchrun, accelerate launch) each line once per job. Shared by
the CLI and by every process that runs a part of a job for it (a Ray worker)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any


def setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if not debug and os.environ.get("RANK", "0") != "0":
        level = logging.ERROR  # rank 0 logs for the job; the other ranks only their errors
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if not debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        for noisy in ("bitsandbytes", "accelerate", "peft", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def progress(total: int, desc: str, unit: str = "it") -> Any:
    """A progress bar with an ETA (tqdm) on stderr for a long piece of work of `total` units
    (`.update(n)`, `.close()`); a silent stand-in when VLMTUNE_NO_PROGRESS=1, on ranks other
    than 0, or for a single unit of work."""
    if os.environ.get("VLMTUNE_NO_PROGRESS") == "1" or os.environ.get("RANK", "0") != "0" or total <= 1:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

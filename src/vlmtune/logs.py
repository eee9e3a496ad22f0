"""How a vlmtune process logs: one line per message on stderr, library noise quieted unless
`debug`, and under a launcher (torchrun, accelerate launch) each line once per job. Shared by
the CLI and by every process that runs a part of a job for it (a Ray worker)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


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

#!/usr/bin/env python
"""Seed 003's standalone evaluation script, kept for users who arrive with its commands:

    python scripts/vlm_evaluate.py --run qwen_vl_chat__lora_r16 --csv data/test.csv --output-dir eval_results/qwen_vl
    python scripts/vlm_evaluate.py --model-id ID --lora-path RUN/lora_adapter --model-type qwen_vl --csv data/test.csv \\
        --batch-size 2 --max-new-tokens 128 [--prompt-template "Question: {query}\\nAnswer:"] [--system-message "..."]

It is `vlmtune evaluate` with the same flags.
"""

import sys
from pathlib import Path

try:
    from vlmtune.cli import main
except ImportError:  # a checkout whose package is not installed in this interpreter
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from vlmtune.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))

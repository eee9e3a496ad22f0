#!/usr/bin/env python
"""Seed 003's entry point, kept for users who arrive with its command:

    python vlm_finetune_and_eval.py --config configs/vlm_ablation.yaml

It is `vlmtune run CONFIG` (train + evaluate every model x LoRA variant, resumably; the
summary and report.html), with every `vlmtune run` flag (`--only`, `--dry-run`, `--set`, ...).
"""

import sys
from pathlib import Path

try:
    from vlmtune.cli import main
except ImportError:  # a checkout whose package is not installed in this interpreter
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from vlmtune.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

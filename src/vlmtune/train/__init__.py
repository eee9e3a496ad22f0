"""Training: what trains (components), supervised fine-tuning (sft)."""

"""Experiments: every model x LoRA variant of a config, trained and evaluated."""

"""Data: sources (CSV/JSONL -> Samples), images, and encoding (chat template, labels, padding)."""

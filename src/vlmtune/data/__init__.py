"""Data: sources (CSV, JSON/JSONL, Parquet, Arrow, `datasets` -> Samples), images, and encoding (chat template, labels, padding)."""

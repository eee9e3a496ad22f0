"""Evaluation: batched generation and metrics."""

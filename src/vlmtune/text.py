"""Text normalisation shared by evaluation metrics and RL rewards."""

from __future__ import annotations

import re
import string

_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 evaluate script's `normalize_answer`: lower, drop punctuation and
    articles (a, an, the), squash whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())

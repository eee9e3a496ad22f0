"""Generation metrics, each computed by (or equal to) its reference implementation.

Inputs: predictions [n] and references [n][k] (k >= 1 per sample). Output, per metric:

    {"value": v, "ci95": [lo, hi], "implementation": ..., "library": ..., "library_version": ...,
     "settings": {...}}

or `{"value": null, "reason": ...}` when it cannot be computed here (no Java for METEOR).

| key | reference |
|---|---|
| exact_match | any(prediction.strip() == reference.strip()), mean over samples |
| exact_match_normalized | the same after the SQuAD v1.1 script's `normalize_answer` |
| bleu4 | sacrebleu BLEU defaults (13a, case-sensitive, exp smoothing), 0-100 |
| rouge_l | rouge_score rougeL F1, Porter stemmer, best reference; tokenizer keeps non-Latin text |
| meteor, cider, coco | pycocoevalcap as lmms-eval runs it (see coco.py) |
| vqa_accuracy, anls, relaxed_accuracy | official VQA / DocVQA / ChartQA scripts (task_metrics.py) |
| cer, wer | jiwer, corpus level, first reference |
| token_stats | prediction/reference lengths in words and model tokens |

Every interval is a percentile bootstrap over samples with one fixed seed (bootstrap.py).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import UserError
from ..text import squad_normalize
from .bootstrap import Bootstrap, mean_aggregate

log = logging.getLogger("vlmtune")

DEFAULT_METRICS = ["exact_match", "bleu4", "meteor", "rouge_l", "cider", "token_stats"]


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Inputs:
    """What every metric sees, plus caches shared between metrics of one `compute` call."""

    predictions: list[str]
    references: list[list[str]]
    bootstrap: Bootstrap
    tokenizer: Any = None
    """A transformers tokenizer for token_stats (None: token lengths are left out)."""
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)

    def mean_entry(self, per_sample: list[float] | np.ndarray) -> dict[str, Any]:
        arr = np.asarray(per_sample, dtype=np.float64)
        return {"value": float(arr.mean()) if arr.size else 0.0, "ci95": self.bootstrap.ci95(arr, mean_aggregate)}


# --------------------------------------------------------------------------------------
# Exact match


def _exact_match(inp: Inputs) -> dict[str, Any]:
    hits = [float(any(p.strip() == r.strip() for r in refs)) for p, refs in zip(inp.predictions, inp.references)]
    return inp.mean_entry(hits)


def _exact_match_normalized(inp: Inputs) -> dict[str, Any]:
    hits = [float(any(squad_normalize(p) == squad_normalize(r) for r in refs)) for p, refs in zip(inp.predictions, inp.references)]
    return inp.mean_entry(hits)


# --------------------------------------------------------------------------------------
# BLEU-4 (sacrebleu)


def _bleu4(inp: Inputs) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU

    bleu = BLEU()  # defaults: 13a tokenizer, case-sensitive, exp smoothing, 4-grams
    k = max(len(r) for r in inp.references)
    # sacrebleu takes reference *streams*; None marks a sample with fewer references.
    streams = [[refs[j] if j < len(refs) else None for refs in inp.references] for j in range(k)]
    score = bleu.corpus_score(inp.predictions, streams)
    stats = np.array(bleu._extract_corpus_statistics(inp.predictions, streams), dtype=np.float64)

    def aggregate(sums: np.ndarray, n: int) -> np.ndarray:
        return np.array([bleu._compute_score_from_stats(row.tolist()).score for row in sums])

    out = {"value": float(score.score), "ci95": inp.bootstrap.ci95(stats, aggregate), "signature": str(bleu.get_signature())}
    if score.sys_len and score.totals[3] == 0:
        out["note"] = "no prediction has 4 tokens, so corpus BLEU-4 is 0 by definition; for short answers read exact_match or rouge_l"
    return out


# --------------------------------------------------------------------------------------
# ROUGE-L (rouge_score) with a tokenizer that does not drop non-Latin text


class UnicodeRougeTokenizer:
    """rouge_score's DefaultTokenizer, except that letters and digits of every script survive.

    The default keeps only [a-z0-9]: Korean, Chinese, Arabic, accented Latin... vanish, and
    two identical Korean answers score 0. Here a token is a run of letters/digits/marks of
    any script; Han, Hiragana and Katakana (written without spaces) become one token per
    character. ASCII text tokenizes exactly as rouge_score's default (same Porter stemmer,
    same "stem only tokens longer than 3" rule); non-ASCII tokens are not stemmed.
    """

    _SPLIT = None  # compiled lazily: the `regex` module (a transformers dependency) knows \p{..}

    def __init__(self, use_stemmer: bool = True):
        import regex
        from nltk.stem import porter

        self._nonword = regex.compile(r"[^\p{L}\p{N}\p{M}]+")
        self._cjk = regex.compile(r"([\p{Han}\p{Hiragana}\p{Katakana}])")
        self._stem = functools.lru_cache(maxsize=200_000)(porter.PorterStemmer().stem) if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        text = self._nonword.sub(" ", text.lower())
        text = self._cjk.sub(r" \1 ", text)
        out = []
        for tok in text.split():
            if self._stem is not None and len(tok) > 3 and tok.isascii():
                tok = self._stem(tok)
            out.append(tok)
        return out


def _rouge_l(inp: Inputs) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer(use_stemmer=True))
    per = [scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(inp.predictions, inp.references)]
    return inp.mean_entry(per)


# --------------------------------------------------------------------------------------
# COCO caption pipeline (Java): METEOR, CIDEr-D, Bleu_1..4 + ROUGE_L


def _coco_tokens(inp: Inputs):
    from .coco import ptb_tokenize

    if "ptb" not in inp.cache:
        try:
            inp.cache["ptb"] = ptb_tokenize(inp.predictions, inp.references)
        except RuntimeError as e:
            inp.cache["ptb"] = e
    return inp.cache["ptb"]


def _coco_metric(fn_name: str) -> Callable[[Inputs], dict[str, Any]]:
    def run(inp: Inputs) -> dict[str, Any]:
        from . import coco

        tok = _coco_tokens(inp)
        if isinstance(tok, Exception):
            return {"value": None, "ci95": None, "reason": str(tok)}
        out = getattr(coco, fn_name)(tok, inp.bootstrap)
        out["java"] = coco.find_java()[1]
        return out

    return run


# --------------------------------------------------------------------------------------
# Task metrics (VQA, DocVQA, ChartQA)


def _task(fn_name: str) -> Callable[[Inputs], dict[str, Any]]:
    def run(inp: Inputs) -> dict[str, Any]:
        from . import task_metrics

        out = inp.mean_entry(getattr(task_metrics, fn_name)(inp.predictions, inp.references))
        single = sum(len(r) < 2 for r in inp.references)
        if fn_name == "vqa_accuracy_per_sample" and single:
            out["note"] = f"{single} samples have a single answer and score 0 by definition (leave-one-out over annotators); use exact_match_normalized for single-answer data"
        return out

    return run


# --------------------------------------------------------------------------------------
# CER / WER (jiwer)


def _error_rate(kind: str) -> Callable[[Inputs], dict[str, Any]]:
    def run(inp: Inputs) -> dict[str, Any]:
        import jiwer

        refs = [r[0] for r in inp.references]
        empty = [i for i, r in enumerate(refs) if not r.strip()]
        if empty:
            return {"value": None, "ci95": None, "reason": f"{len(empty)} empty first references (e.g. sample {empty[0]}): jiwer cannot score them"}
        process = jiwer.process_words if kind == "wer" else jiwer.process_characters
        value = (jiwer.wer if kind == "wer" else jiwer.cer)(refs, inp.predictions)
        stats = []
        for r, p in zip(refs, inp.predictions):
            o = process(r, p)
            stats.append([o.substitutions + o.deletions + o.insertions, o.substitutions + o.deletions + o.hits])

        def aggregate(sums: np.ndarray, n: int) -> np.ndarray:
            return sums[:, 0] / sums[:, 1]

        return {"value": float(value), "ci95": inp.bootstrap.ci95(np.array(stats, dtype=np.float64), aggregate)}

    return run


# --------------------------------------------------------------------------------------
# Token statistics


def _token_stats(inp: Inputs) -> dict[str, Any]:
    series: dict[str, list[int]] = {
        "prediction_words": [len(p.split()) for p in inp.predictions],
        "reference_words": [len(r.split()) for refs in inp.references for r in refs],
    }
    note = None
    if inp.tokenizer is not None:
        enc = lambda texts: [len(ids) for ids in inp.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        series["prediction_tokens"] = enc(inp.predictions)
        series["reference_tokens"] = enc([r for refs in inp.references for r in refs])
    else:
        note = "no tokenizer given: lengths in model tokens left out"
    value: dict[str, float] = {}
    ci: dict[str, Optional[list[float]]] = {}
    for name, xs in series.items():
        value[f"{name}_mean"] = float(np.mean(xs)) if xs else 0.0
        value[f"{name}_median"] = float(statistics.median(xs)) if xs else 0.0
        # Intervals for the prediction means only: references per sample vary in number.
        if name.startswith("prediction"):
            ci[f"{name}_mean"] = inp.bootstrap.ci95(np.array(xs, dtype=np.float64), mean_aggregate)
    out: dict[str, Any] = {"value": value, "ci95": ci}
    if note:
        out["note"] = note
    return out


# --------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Metric:
    fn: Callable[[Inputs], dict[str, Any]]
    implementation: str
    library: Optional[str]
    settings: dict[str, Any]
    java: bool = False


METRICS: dict[str, Metric] = {
    "exact_match": Metric(_exact_match, "any(prediction.strip() == reference.strip())", None, {"strip": True, "case_sensitive": True}),
    "exact_match_normalized": Metric(_exact_match_normalized, "exact match after SQuAD v1.1 normalize_answer", None, {"normalization": "squad_v1.1"}),
    "bleu4": Metric(_bleu4, "sacrebleu.metrics.BLEU().corpus_score", "sacrebleu", {"tokenize": "13a", "lowercase": False, "smooth_method": "exp", "max_ngram_order": 4, "scale": "0-100"}),
    "rouge_l": Metric(_rouge_l, "rouge_score RougeScorer(['rougeL']).score_multi, F1, mean over samples", "rouge-score",
                      {"use_stemmer": True, "tokenizer": "rouge_score default on ASCII; letters/digits of every script kept, CJK per character", "multi_reference": "best F1"}),
    "meteor": Metric(_coco_metric("meteor"), "pycocoevalcap PTBTokenizer + METEOR 1.5 jar corpus aggregate (as lmms-eval)", "pycocoevalcap", {"language": "en", "norm": True}, java=True),
    "cider": Metric(_coco_metric("cider"), "pycocoevalcap PTBTokenizer + Cider (CIDEr-D)", "pycocoevalcap", {"n": 4, "sigma": 6.0}, java=True),
    "coco": Metric(_coco_metric("coco"), "pycocoevalcap PTBTokenizer + Bleu(4) (closest ref length) + Rouge", "pycocoevalcap", {"bleu_reflen": "closest"}, java=True),
    "vqa_accuracy": Metric(_task("vqa_accuracy_per_sample"), "official VQA accuracy: normalised answers, min(1, matches/3) over leave-one-out subsets", None, {"normalization": "VQA v2 (vqaEval.py / lmms-eval EvalAIAnswerProcessor)"}),
    "anls": Metric(_task("anls_per_sample"), "official DocVQA ANLS", "rapidfuzz", {"threshold": 0.5}),
    "relaxed_accuracy": Metric(_task("relaxed_accuracy_per_sample"), "ChartQA relaxed correctness, best reference", None, {"max_relative_change": 0.05}),
    "cer": Metric(_error_rate("cer"), "jiwer.cer, corpus level, first reference", "jiwer", {"reference": "first"}),
    "wer": Metric(_error_rate("wer"), "jiwer.wer, corpus level, first reference", "jiwer", {"reference": "first"}),
    "token_stats": Metric(_token_stats, "lengths in whitespace words and model tokens (no special tokens)", None, {}),
}


def check_names(names: list[str], where: str = "evaluation.metrics") -> list[str]:
    for name in names:
        if name not in METRICS:
            import difflib

            near = difflib.get_close_matches(name, list(METRICS), n=1)
            fix = f"did you mean {near[0]!r}?" if near else f"available: {', '.join(METRICS)}"
            raise UserError(where, f"unknown metric {name!r}", fix)
    return names


def compute(names: list[str], predictions: list[str], references: list[list[str]], tokenizer: Any = None,
            bootstrap: Optional[Bootstrap] = None) -> dict[str, dict[str, Any]]:
    """{metric name: entry} for `names` (see the module docstring for the entry's shape)."""
    check_names(names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every sample needs at least one reference")
    inp = Inputs(list(predictions), [list(r) for r in references], bootstrap or Bootstrap(), tokenizer)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        m = METRICS[name]
        if inp.n == 0:
            entry: dict[str, Any] = {"value": None, "ci95": None, "reason": "no samples"}
        else:
            entry = m.fn(inp)
        out[name] = {
            **entry,
            "implementation": m.implementation,
            "library": m.library,
            "library_version": _version(m.library) if m.library else None,
            "settings": m.settings,
        }
    return out

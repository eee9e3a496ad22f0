"""Per-sample task metrics for VLM benchmarks, bit-compatible with their reference scripts.

Each function takes predictions ``[n]`` and references ``[n][k]`` (k >= 1) and returns one
score per sample, so callers can average, bootstrap or break scores down by subset.

The references these reproduce (including their quirks, which are deliberate: a score that
differs from the leaderboard script is not comparable with published numbers):

* VQA accuracy: lmms-eval ``vqav2_process_results``
  (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/vqav2/utils.py),
  a port of the official ``VQAEval.evaluate`` loop
  (https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py)
  with lmms-eval's ``EvalAIAnswerProcessor`` applied to the prediction first
  (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/_task_utils/vqa_eval_metric.py).
* ANLS: the DocVQA / InfographicVQA RRC script (https://rrc.cvc.uab.es/?ch=17), as copied
  into lmms-eval ``lmms_eval/api/metrics.py::anls``
  (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/api/metrics.py).
* ChartQA relaxed accuracy: lmms-eval ``chartqa/utils.py::relaxed_correctness``
  (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/chartqa/utils.py),
  itself from pix2struct via Qwen-VL.

``tests/reference/official_eval.py`` holds verbatim copies of those sources and
``tests/test_task_metrics.py`` checks this module against them.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "vqa_normalize",
    "vqa_accuracy_per_sample",
    "anls_per_sample",
    "relaxed_accuracy_per_sample",
]

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation tables, copied verbatim from vqaEval.py / EvalAIAnswerProcessor.
# Keys with capitals ("Im", "Ive", "Id've", "I'dve") can never match because text is lowercased
# first; they are kept so the tables stay identical to the reference.
# ---------------------------------------------------------------------------------------------

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_NUMBER_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# "(?!<=\d)" is a typo for a lookbehind in the reference; as written it is a lookahead that can
# never fail at a ".", so every period not followed by a digit is stripped. Kept as-is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# lmms-eval's variant (the official script uses r"(\d)(\,)(\d)"); it only differs for runs of
# commas between digits such as "1,,2". It is only used as a presence test.
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")

# Same order as the reference; the result does not depend on it, since each mark's fate is
# decided against the unedited input.
_PUNCTUATIONS: tuple[str, ...] = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Both references call PERIOD_STRIP.sub("", text, re.UNICODE): the flag lands in the positional
# `count` argument, so at most int(re.UNICODE) == 32 periods are removed per string.
_PERIOD_STRIP_MAX_SUBS = int(re.UNICODE)


def _process_punctuation(in_text: str) -> str:
    # Whether a character is deleted or turned into a space depends on the *input* text (any
    # spaced occurrence, or any digit,digit anywhere), not on the partially edited output.
    has_digit_comma = _COMMA_STRIP.search(in_text) is not None
    out_text = in_text
    for p in _PUNCTUATIONS:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_MAX_SUBS)


def _process_digit_article(in_text: str) -> str:
    # Split on any Unicode whitespace (str.split()), as the reference does, so NBSP and
    # U+2028 separate words too.
    words = [_NUMBER_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """Normalise a VQA answer exactly like lmms-eval's ``EvalAIAnswerProcessor.__call__``.

    That is the official VQA normalisation (``processPunctuation`` + ``processDigitArticle``
    from GT-Vision-Lab ``vqaEval.py``, https://github.com/GT-Vision-Lab/VQA) preceded by
    EvalAI's ``word_tokenize`` (lowercase, drop "," and "?", split "'s") and newline/tab
    replacement; see
    https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/_task_utils/vqa_eval_metric.py
    """
    item = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    item = _process_punctuation(item)
    return _process_digit_article(item)


def _check_lengths(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            # Every reference implementation crashes here (min() / mean() of nothing); a clear
            # error beats a silently invented score.
            raise ValueError(f"sample {i} has no reference answers")


def _vqa_accuracy_one(prediction: str, answers: list[str]) -> float:
    res = vqa_normalize(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    # The answers are normalised every time (vlmtune's rule). lmms-eval, following the official
    # evaluate loop, normalises them only when the annotators disagree and compares unanimous
    # answers raw, so "two" vs ["Two"] x 10 scores 0 there and 1 here; where annotators
    # disagree the two agree exactly, including the second normalisation of the prediction
    # (which strips another 32 periods).
    gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
    res = _process_digit_article(_process_punctuation(res))
    # Leave-one-out over annotators: dropping an answer equal to the prediction leaves m - 1
    # matches, dropping any other leaves m. (VQA v2 answers carry distinct answer_ids, so the
    # reference's `item != gtAnsDatum` removes exactly one answer even among duplicates.)
    n = len(gts)
    m = sum(g == res for g in gts)
    per_subset = [min(1.0, (m - 1) / 3)] * m + [min(1.0, m / 3)] * (n - m)
    return math.fsum(per_subset) / n


def vqa_accuracy_per_sample(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Official VQA accuracy per sample, matching lmms-eval ``vqav2_process_results``.

    Prediction and answers are normalised every time (lmms-eval skips the answers when they
    are unanimous -- see `_vqa_accuracy_one`). For each of the n leave-one-out subsets of the
    answers, acc = min(1, matches / 3); the score is the mean over subsets. With a single
    answer the only subset is empty, so the score is always 0.0, exactly as in the reference:
    VQA accuracy needs several annotators per question. See
    https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/vqav2/utils.py
    """
    _check_lengths(predictions, references)
    return [_vqa_accuracy_one(p, refs) for p, refs in zip(predictions, references)]


def anls_per_sample(
    predictions: list[str], references: list[list[str]], threshold: float = 0.5
) -> list[float]:
    """Average Normalized Levenshtein Similarity per sample (DocVQA / InfographicVQA).

    Matches the RRC evaluation script (https://rrc.cvc.uab.es/?ch=17) as copied into lmms-eval
    ``lmms_eval/api/metrics.py::anls``
    (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/api/metrics.py):
    score = 1 - min over answers of NL, zeroed when below ``threshold``.
    """
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("anls_per_sample needs `rapidfuzz` (pip install rapidfuzz)") from e

    _check_lengths(predictions, references)
    out: list[float] = []
    for pred, answers in zip(predictions, references):
        det_answer = " ".join(pred.strip().lower().split())
        values = []
        for answer in answers:
            gt_answer = " ".join(answer.strip().lower().split())
            dist = Levenshtein.distance(gt_answer, det_answer)
            # The reference divides by the length of the *raw* strings (untrimmed, before
            # whitespace collapsing; .upper() can even lengthen e.g. "ß"), not of the compared
            # ones, so padded answers score higher than their trimmed forms would.
            length = max(len(answer.upper()), len(pred.upper()))
            values.append(0.0 if length == 0 else float(dist) / float(length))
        score = 1 - min(values)
        out.append(0.0 if score < threshold else float(score))
    return out


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_correctness(prediction: str, target: str, max_relative_change: float) -> bool:
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    # A target of 0 falls through to a string comparison (so "0" vs "0.0" is wrong), as in
    # the reference, which guards the division this way.
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy_per_sample(
    predictions: list[str], references: list[list[str]], tolerance: float = 0.05
) -> list[float]:
    """ChartQA relaxed accuracy per sample: 1.0 if any reference is relaxed-correct, else 0.0.

    Numbers (with "%" read as /100) may be within ``tolerance`` relative error of the target;
    anything else must match case-insensitively. No stripping is applied, as in lmms-eval
    ``chartqa_process_results`` / ``relaxed_correctness``
    (https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/chartqa/utils.py).
    """
    _check_lengths(predictions, references)
    return [
        1.0 if any(_relaxed_correctness(p, t, tolerance) for t in refs) else 0.0
        for p, refs in zip(predictions, references)
    ]

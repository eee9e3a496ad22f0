"""vlmtune.eval.task_metrics against verbatim copies of the reference scripts
(tests/reference/official_eval.py): every score must agree to 1e-6, and a few hand-computed
values pin the behaviour independently of the oracle."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from vlmtune.eval import task_metrics as tm
from vlmtune.eval.task_metrics import (
    anls_per_sample,
    relaxed_accuracy_per_sample,
    vqa_accuracy_per_sample,
    vqa_normalize,
)


def _load_oracle():
    # tests/ is not a package; load by path under a name that cannot clash with anything.
    name = "_vlmtune_official_eval_oracle"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).parent / "reference" / "official_eval.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_oracle()
TOL = 1e-6

LONG_TEXT = (
    "The quick brown fox. Jumps over the lazy dog. Ok. " * 12
    + "Two cats, three dogs; a bird (maybe) - and the 1,000 fish? Yes. It's 3.5 m. "
)
assert len(LONG_TEXT) > 500 and LONG_TEXT.count(".") > 32

NORMALIZATION_CASES = [
    "dont", "isnt", "Dont", "I dont know", "whats that", "Im", "Ive", "let's go", "she's",
    "two", "Two", "TWO", "none", "zero", "ten", "eleven", "two dogs", "one of ten",
    "the cat", "a dog", "an apple", "The", "a an the", "theater", "another",
    "1,000", "1,000,000 dollars", "1,,2", "3.5", "3 . 5", "yes.", "Yes!", "YES", "yes?",
    "no.", "e.g.", "U.S.A.", "Dr. Who?", "end.", ".5", "5.", "a.b", "a. b",
    "hello, world", "red,blue", "red, blue", "x - y", "x-y", "(left)", "( left )", "1/2",
    "a/b", 'say "hi"', "[1]", "{x}", "a=b", "a+b", "back\\slash", "snake_case", "x > y",
    "x<y", "me@site", "`code`", "wow!", "what's up", "it's red", "cat's toy", "let's",
    "", "   ", "\n\tcat\t\n", "line1\nline2", "tab\tsep", "  padded  ",
    "고양이", "고양이입니다.", "두 마리 고양이", "猫", "两只猫。", "猫, 狗", "Ünïcödé", "straße", "İstanbul",
    "café.", "naïve", "ﬁne", "\u00a0nbsp\u00a0", "a\u2028b", "10 people", "3 o'clock", "oclock",
    LONG_TEXT, LONG_TEXT.upper(), "." * 40 + "x", "a." * 40, "yes" + "." * 40,
    "a-b (-c", "x/y [/z]", "red-blue (green)", "o-k (x)", "1,000 (approx.)",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", NORMALIZATION_CASES)
def test_vqa_normalize_matches_lmms_eval_processor(text):
    assert vqa_normalize(text) == ref.oracle_vqa_normalize(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Two", "2"),
        ("none", "0"),
        ("The Dog.", "dog"),
        ("an apple", "apple"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("x-y", "x y"),
        ("x - y", "x y"),
        ("what's up", "what 's up"),
        ("\n\tcat\t\n", "cat"),
        ("고양이.", "고양이"),
        ("", ""),
        # Delete-or-space is decided on the *input*: " (" deletes "(", which leaves " -c",
        # but "-" had no space beside it in the input, so it still becomes a space.
        ("a-b (-c", "b c"),
    ],
)
def test_vqa_normalize_known_values(text, expected):
    assert vqa_normalize(text) == expected


def test_period_strip_stops_after_32_like_the_reference():
    # re.UNICODE (== 32) is passed as `count` in the reference, so only 32 periods go.
    text = "a." * 40
    assert vqa_normalize(text).count(".") == 8
    assert vqa_normalize(text) == ref.oracle_vqa_normalize(text)


def test_tables_are_the_official_ones():
    official = ref.official_vqa_eval()
    assert tm._CONTRACTIONS == official.contractions == ref.EvalAIAnswerProcessor.CONTRACTIONS
    assert tm._NUMBER_MAP == official.manualMap
    # The reference's NUMBER_MAP.setdefault(word, word) grows the class dict with identity
    # entries as it runs; only the real mappings are the table.
    lmms_map = {k: v for k, v in ref.EvalAIAnswerProcessor.NUMBER_MAP.items() if k != v}
    assert tm._NUMBER_MAP == lmms_map
    assert set(tm._ARTICLES) == set(official.articles) == set(ref.EvalAIAnswerProcessor.ARTICLES)
    assert list(tm._PUNCTUATIONS) == official.punct == ref.EvalAIAnswerProcessor.PUNCTUATIONS
    assert tm._PERIOD_STRIP.pattern == official.periodStrip.pattern
    assert tm._COMMA_STRIP.pattern == ref.EvalAIAnswerProcessor.COMMA_STRIP.pattern


@pytest.mark.parametrize("text", NORMALIZATION_CASES)
def test_helpers_match_both_references(text):
    lmms = ref.EvalAIAnswerProcessor()
    official = ref.official_vqa_eval()
    assert tm._process_punctuation(text) == lmms.process_punctuation(text)
    assert tm._process_digit_article(text) == lmms.process_digit_article(text)
    assert tm._process_digit_article(text) == official.processDigitArticle(text)
    if ",," not in text:  # the two COMMA_STRIP regexes only disagree on runs of commas
        assert tm._process_punctuation(text) == official.processPunctuation(text)


def test_comma_strip_variant_is_lmms_evals():
    # lmms-eval's COMMA_STRIP sees "1,,2" as a digit-comma-digit; the official one does not.
    official = ref.official_vqa_eval()
    lmms = ref.EvalAIAnswerProcessor()
    text = "1,,2 (x)"
    assert lmms.process_punctuation(text) != official.processPunctuation(text)
    assert tm._process_punctuation(text) == lmms.process_punctuation(text)


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------

VQA_CASES: list[tuple[str, list[str]]] = [
    # partial agreement among 10 annotators: 0..4 and 10 matching answers
    *[("yes", ["yes"] * m + ["no"] * (10 - m)) for m in (0, 1, 2, 3, 4, 10)],
    *[("Two", ["2"] * m + ["3"] * (10 - m)) for m in (0, 1, 2, 3, 4)],
    ("dont", ["don't"] * 3 + ["do not"] * 7),
    ("isnt", ["isn't", "isnt", "is not", "no", "no", "isn't", "nope", "no", "isn't", "x"]),
    ("The red car.", ["red car", "red", "car", "red car", "the red car", "a red car", "red", "red", "x", "y"]),
    ("1,000", ["1000", "1,000", "1000", "thousand", "1 000", "1000", "1000", "a", "b", "c"]),
    ("3.5", ["3.5", "3.5", "3", "4", "3.50", "three and half", "3.5", "3.5", "3.5", "3.5"]),
    ("yes.", ["yes", "yes", "yes", "Yes", "YES", "yes!", "no", "no", "yes", "yes"]),
    ("YES", ["Yes", "yes", "no", "no", "no", "no", "no", "no", "no", "no"]),
    # unanimous answers (lmms-eval compares them raw; vlmtune normalises them)
    ("two", ["2"] * 10),
    ("two", ["Two"] * 10),
    ("Yes.", ["yes"] * 10),
    ("Yes.", ["Yes"] * 10),
    ("the dog", ["the dog"] * 10),
    ("dog", [" dog\n"] * 10),
    # the prediction is normalised twice when answers disagree; with > 32 periods the
    # second pass strips more of them (count=re.UNICODE quirk)
    ("yes" + "." * 40, ["yes"] * 5 + ["no"] * 5),
    ("yes" + "." * 40, ["yes"] * 10),
    # fewer than 10 answers, single answers
    ("yes", ["yes", "yes", "no"]),
    ("yes", ["yes", "yes"]),
    ("yes", ["yes", "no"]),
    ("yes", ["yes"]),
    ("no", ["yes"]),
    ("yes", ["yes", "yes", "yes", "yes"]),
    # empty prediction / empty answers
    ("", ["", "", "", "x", "y", "z", "", "a", "b", "c"]),
    ("", ["yes"] * 10),
    ("", [""] * 10),
    ("something", ["", "something", "something", "", "", "", "", "", "", ""]),
    # non-Latin
    ("고양이", ["고양이"] * 4 + ["개"] * 6),
    ("고양이.", ["고양이", "고양이", "고양이", "강아지", "개", "고양이", "x", "y", "z", "w"]),
    ("两只猫", ["两只猫", "两只猫", "猫", "两只猫", "两只", "猫", "猫", "猫", "猫", "猫"]),
    # whitespace in answers, long text
    ("red", ["red\n", "\tred", " red ", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]),
    (LONG_TEXT, [LONG_TEXT] * 3 + ["short"] * 7),
    (LONG_TEXT, [LONG_TEXT.lower()] * 5 + [LONG_TEXT] * 5),
]


def expected_vqa(prediction, answers):
    """lmms-eval's score where its annotators disagree (its normalising path). Where they are
    unanimous lmms-eval compares the raw answers; vlmtune normalises them every time, so the
    expectation is built from the official normalisation functions and the official
    leave-one-out values (m matches of n: m subsets with m-1, n-m subsets with m)."""
    stripped = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(stripped)) > 1:
        return ref.oracle_vqa_accuracy(prediction, answers)
    e = ref.official_vqa_eval()
    norm = lambda t: e.processDigitArticle(e.processPunctuation(t))
    res = norm(ref.oracle_vqa_normalize(prediction))
    n = len(stripped)
    m = sum(norm(a) == res for a in stripped)
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


@pytest.mark.parametrize("prediction, answers", VQA_CASES)
def test_vqa_accuracy_matches_lmms_eval(prediction, answers):
    (got,) = vqa_accuracy_per_sample([prediction], [answers])
    assert got == pytest.approx(expected_vqa(prediction, answers), abs=TOL)


def test_vqa_answers_are_normalised_even_when_unanimous():
    # lmms-eval leaves unanimous answers raw: "Two" x 10 never matches a normalised "two"
    assert ref.oracle_vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy_per_sample(["two", "Yes.", "dog"], [["Two"] * 10, ["Yes"] * 10, [" dog\n"] * 10]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "m, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out_values(m, expected):
    # Hand-computed: mean over the 10 leave-one-out subsets of min(1, matches / 3).
    (got,) = vqa_accuracy_per_sample(["yes"], [["yes"] * m + ["no"] * (10 - m)])
    assert got == pytest.approx(expected, abs=TOL)


def test_vqa_accuracy_quirks():
    scores = vqa_accuracy_per_sample(
        ["yes", "yes", "two", "two", "yes"],
        [["yes"], ["yes", "yes", "no"], ["2"] * 10, ["Two"] * 10, ["yes", "yes"]],
    )
    # one answer: its only leave-one-out subset is empty; 2 of 3: (2*(1/3) + 2/3) / 3;
    # unanimous "Two" is normalised to "2" like the prediction.
    assert scores == pytest.approx([0.0, 4 / 9, 1.0, 1.0, 1 / 3], abs=TOL)


def test_vqa_accuracy_batch_matches_per_sample():
    preds = [p for p, _ in VQA_CASES]
    refs = [a for _, a in VQA_CASES]
    got = vqa_accuracy_per_sample(preds, refs)
    want = [expected_vqa(p, a) for p, a in VQA_CASES]
    assert got == pytest.approx(want, abs=TOL)


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------

ANLS_CASES: list[tuple[str, list[str]]] = [
    ("hello world", ["hello world"]),
    ("Hello World", ["hello world"]),
    ("hello wrld", ["  hello world  "]),
    ("  hello wrld  ", ["hello world"]),
    ("a   b", ["a b"]),
    ("", [""]),
    ("", ["abc"]),
    ("abc", [""]),
    ("", ["", "abc"]),
    ("abcdefghij", ["abcdefghij"]),
    ("abcdeVWXYZ", ["abcdefghij"]),  # 5 edits of 10: exactly 0.5, kept
    ("abcdUVWXYZ", ["abcdefghij"]),  # 6 edits of 10: 0.4, zeroed
    ("abcdefgXYZ", ["abcdefghij"]),
    ("abcd", ["abcdefghij"]),
    ("abcde", ["abcdefghij"]),
    ("abcdef", ["abcdefghij"]),
    ("cat", ["dog", "cart", "cat "]),
    ("University of California", ["UC San Diego", "university of california, san diego"]),
    ("$1,234.56", ["1,234.56", "$1234.56"]),
    ("고양이들", ["고양이"]),
    ("两只猫", ["两只狗", "三只猫"]),
    ("strasse", ["straße"]),
    ("STRASSE", ["Straße "]),
    ("ﬁle", ["file"]),
    ("İstanbul", ["istanbul"]),
    (LONG_TEXT, [LONG_TEXT.replace("fox", "cat")]),
    (LONG_TEXT, [LONG_TEXT[:250]]),
    (LONG_TEXT[:260], [LONG_TEXT[:250] + "xxxxxxxxxx"]),
]


@pytest.mark.parametrize("prediction, answers", ANLS_CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.0, 0.8])
def test_anls_matches_reference(prediction, answers, threshold):
    (got,) = anls_per_sample([prediction], [answers], threshold=threshold)
    assert got == pytest.approx(ref.oracle_anls(prediction, answers, threshold), abs=TOL)


def test_anls_known_values():
    got = anls_per_sample(
        ["hello wrld", "abcdeVWXYZ", "abcdUVWXYZ", "", "", "고양이들", "strasse", "a   b"],
        [["  hello world  "], ["abcdefghij"], ["abcdefghij"], [""], ["abc"], ["고양이"], ["straße"], ["a b"]],
    )
    # raw-length denominator (15, not 11); threshold is "< 0.5 -> 0"; both empty -> 1;
    # "straße".upper() is 7 long and "ß" -> "ss" costs 2 edits.
    want = [1 - 1 / 15, 0.5, 0.0, 1.0, 0.0, 0.75, 1 - 2 / 7, 1.0]
    assert got == pytest.approx(want, abs=TOL)


def test_anls_near_threshold():
    answer = "abcdefghijklmnopqrst"  # 20 chars
    preds = [answer[: 20 - k] + "#" * k for k in (9, 10, 11)]  # 0.55, 0.5, 0.45
    got = anls_per_sample(preds, [[answer]] * 3)
    assert got == pytest.approx([0.55, 0.5, 0.0], abs=TOL)
    assert got == pytest.approx([ref.oracle_anls(p, [answer]) for p in preds], abs=TOL)


# ---------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------

RELAXED_CASES: list[tuple[str, list[str]]] = [
    ("12", ["12"]),
    ("12.5", ["12"]),
    ("13", ["12"]),
    ("105", ["100"]),
    ("105.0001", ["100"]),
    ("95", ["100"]),
    ("94.99", ["100"]),
    ("-12", ["-12.3"]),
    ("5%", ["0.05"]),
    ("5%", ["5"]),
    ("5", ["5%"]),
    ("50%", ["50%"]),
    ("50.5%", ["50%"]),
    ("5 %", ["0.05"]),
    ("5%%", ["0.05"]),
    ("%", ["0"]),
    ("0", ["0"]),
    ("0.0", ["0"]),
    ("0.001", ["0"]),
    ("1,000", ["1000"]),
    ("1000", ["1,000"]),
    (" 12 ", ["12"]),
    ("12.", ["12"]),
    ("1e3", ["1000"]),
    ("1_000", ["1000"]),
    ("nan", ["nan"]),
    ("inf", ["inf"]),
    ("inf", ["5"]),
    ("Yes", ["yes"]),
    (" yes", ["yes"]),
    ("yes.", ["yes"]),
    ("", [""]),
    ("", ["0"]),
    ("고양이", ["고양이"]),
    ("十二", ["12"]),
    ("Nov", ["November", "nov"]),
    ("13", ["20", "12.5"]),
    ("13", ["20", "30"]),
    (LONG_TEXT, [LONG_TEXT.lower()]),
]


@pytest.mark.parametrize("prediction, answers", RELAXED_CASES)
@pytest.mark.parametrize("tolerance", [0.05, 0.0, 0.1])
def test_relaxed_accuracy_matches_lmms_eval(prediction, answers, tolerance):
    (got,) = relaxed_accuracy_per_sample([prediction], [answers], tolerance=tolerance)
    assert got == pytest.approx(ref.oracle_relaxed_accuracy(prediction, answers, tolerance), abs=TOL)


def test_relaxed_accuracy_known_values():
    preds = ["12.5", "13", "105", "5%", "5", "0.0", " yes", "Yes", "1,000", "13"]
    refs = [["12"], ["12"], ["100"], ["0.05"], ["5%"], ["0"], ["yes"], ["yes"], ["1000"], ["20", "12.5"]]
    want = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert relaxed_accuracy_per_sample(preds, refs) == want


# ---------------------------------------------------------------------------------------------
# Randomised comparison
# ---------------------------------------------------------------------------------------------

_TOKENS = [
    "yes", "no", "Yes", "NO", "two", "2", "Two", "three", "3", "none", "0", "ten", "10",
    "the", "a", "an", "The", "dont", "don't", "isnt", "whats", "cat", "cats", "dog", "red",
    "1,000", "1000", "3.5", "3", ".", ",", "?", "!", "-", "/", "(", ")", '"', "'s", "%",
    "고양이", "개", "猫", "两只", "é", "ß", "50%", "0.5", "12", "12.4",
]  # fmt: skip
_SEPARATORS = [" ", " ", " ", "", "  ", "\n", "\t", ", ", ". "]


def _random_text(rng: random.Random, max_tokens: int = 4) -> str:
    n = rng.randint(0, max_tokens)
    out = ""
    for i in range(n):
        out += rng.choice(_TOKENS) + (rng.choice(_SEPARATORS) if i < n - 1 else "")
    if rng.random() < 0.2:
        out = " " + out + rng.choice(["", " ", ".", "!", "\n"])
    return out


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.3 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.6:
            chars.insert(pos, rng.choice("abcxyz 1.,고猫ß"))
        elif chars:
            chars[min(pos, len(chars) - 1)] = rng.choice("ABCxyz 2-")
    out = "".join(chars)
    return out.upper() if rng.random() < 0.1 else out


def test_randomized_against_oracle():
    rng = random.Random(20240611)
    n_pairs = 400
    preds, vqa_refs, anls_refs, rel_refs = [], [], [], []
    for _ in range(n_pairs):
        pool = [_random_text(rng) for _ in range(rng.randint(1, 3))]
        answers = [rng.choice(pool) for _ in range(rng.choice([1, 2, 3, 5, 10, 10, 10]))]
        pred = rng.choice([rng.choice(pool), _mutate(rng, rng.choice(pool)), _random_text(rng)])
        preds.append(pred)
        vqa_refs.append(answers)
        anls_refs.append([_mutate(rng, a) for a in answers[: rng.randint(1, 3)]])
        number = rng.choice([0, 1, 7, 12.5, 100, 2023, -4, 0.05, 1e6])
        rel_refs.append(
            [rng.choice([str(number), f"{number}%", f"{number * rng.uniform(0.9, 1.1):.3f}", rng.choice(_TOKENS)])]
        )

    vqa = vqa_accuracy_per_sample(preds, vqa_refs)
    anls = anls_per_sample(preds, anls_refs)
    rel_preds = [rng.choice([p, r[0], str(float(rng.randint(-5, 200))), f"{rng.randint(0, 100)}%"]) for p, r in zip(preds, rel_refs)]
    rel = relaxed_accuracy_per_sample(rel_preds, rel_refs)

    want_vqa = [expected_vqa(p, a) for p, a in zip(preds, vqa_refs)]
    want_anls = [ref.oracle_anls(p, a) for p, a in zip(preds, anls_refs)]
    want_rel = [ref.oracle_relaxed_accuracy(p, a) for p, a in zip(rel_preds, rel_refs)]
    assert vqa == pytest.approx(want_vqa, abs=TOL)
    assert anls == pytest.approx(want_anls, abs=TOL)
    assert rel == pytest.approx(want_rel, abs=TOL)
    for p in preds:
        assert vqa_normalize(p) == ref.oracle_vqa_normalize(p)

    # The generator must actually exercise the interesting regions, or the test proves little.
    assert len({round(v, 6) for v in vqa}) >= 5
    assert sum(0 < v < 1 for v in vqa) >= 20
    assert sum(0.5 <= a < 1 for a in anls) >= 20 and sum(a == 0 for a in anls) >= 20
    assert 20 <= sum(rel) <= n_pairs - 20


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [vqa_accuracy_per_sample, anls_per_sample, relaxed_accuracy_per_sample])
def test_rejects_mismatched_or_empty_references(fn):
    with pytest.raises(ValueError):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        fn(["a"], [[]])
    assert fn([], []) == []

"""Every metric equals its reference implementation on the same inputs (to 1e-6).

Test vectors cover multi-reference, empty prediction, punctuation/casing, Korean and Chinese
text and long text; the expected values come from calling the reference libraries here.
"""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from vlmtune.eval import metrics as M
from vlmtune.eval.bootstrap import Bootstrap, mean_aggregate


def _ref(name):
    spec = importlib.util.spec_from_file_location(f"ref_{name}", Path(__file__).parent / "reference" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _long(seed: int, n_words: int = 300) -> str:
    rng = random.Random(seed)
    words = "the a red blue circle square sits on mat near two three big small cat dog image shows left right of".split()
    return " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."


PREDS = [
    "a red circle",
    "The cat sat on the mat.",
    "",
    "고양이가 있다",
    "two dogs",
    "RED CIRCLE!",
    "我爱猫",
    _long(1),
    "It's a dog, isn't it?",
    "3.5 meters",
]
REFS = [
    ["a red circle", "red circle"],
    ["the cat is on the mat", "a cat sits on a mat", "cat on mat"],
    ["blue"],
    ["고양이가 있다"],
    ["2 dogs", "two dogs playing"],
    ["red circle"],
    ["我爱狗"],
    [_long(2), _long(1)[:400]],
    ["it is a dog"],
    ["3.5 m", "3.5 meters"],
]


@pytest.fixture(scope="module")
def scores():
    names = ["exact_match", "exact_match_normalized", "bleu4", "rouge_l", "meteor", "cider", "coco", "cer", "wer", "token_stats"]
    return M.compute(names, PREDS, REFS)


def test_exact_match(scores):
    # by hand: 0 (exact), 4 (Korean), 9 (second reference) match after strip; 5 differs by case
    assert scores["exact_match"]["value"] == pytest.approx(3 / 10)
    assert M.compute(["exact_match"], [" a b "], [["a b"]])["exact_match"]["value"] == 1.0
    assert M.compute(["exact_match"], ["A b"], [["a b"]])["exact_match"]["value"] == 0.0


def test_exact_match_normalized_equals_squad_script(scores):
    squad = _ref("squad_v1")
    expected = np.mean([squad.metric_max_over_ground_truths(squad.exact_match_score, p, r) for p, r in zip(PREDS, REFS)])
    assert scores["exact_match_normalized"]["value"] == pytest.approx(expected, abs=1e-6)
    assert expected > scores["exact_match"]["value"]  # casing/punctuation case 5 now matches
    for s in ["The  Cat, the hat!", "an apple", "théâtre — l'été", "A.B.C."]:
        assert M.squad_normalize(s) == squad.normalize_answer(s)


def test_bleu4_equals_sacrebleu(scores):
    import sacrebleu

    k = max(len(r) for r in REFS)
    streams = [[r[j] if j < len(r) else None for r in REFS] for j in range(k)]
    ref = sacrebleu.corpus_bleu(PREDS, streams)
    assert scores["bleu4"]["value"] == pytest.approx(ref.score, abs=1e-6)
    assert "tok:13a" in scores["bleu4"]["signature"] and "smooth:exp" in scores["bleu4"]["signature"]
    # single reference, casing matters (sacrebleu default is case-sensitive)
    one = M.compute(["bleu4"], ["The Cat sat on the mat today ."], [["the cat sat on the mat today ."]])["bleu4"]["value"]
    assert one == pytest.approx(sacrebleu.corpus_bleu(["The Cat sat on the mat today ."], [["the cat sat on the mat today ."]]).score, abs=1e-6)
    assert one < 100


def test_rouge_l_equals_rouge_score_on_ascii():
    from rouge_score import rouge_scorer

    ascii_idx = [i for i, p in enumerate(PREDS) if p.isascii() and all(r.isascii() for r in REFS[i])]
    preds, refs = [PREDS[i] for i in ascii_idx], [REFS[i] for i in ascii_idx]
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([sc.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])
    got = M.compute(["rouge_l"], preds, refs)["rouge_l"]["value"]
    assert got == pytest.approx(expected, abs=1e-6)
    # token level too: the stemmer and the >3-characters rule
    from rouge_score import tokenize
    from nltk.stem import porter

    tok = M.UnicodeRougeTokenizer()
    for text in PREDS + [r for rs in REFS for r in rs]:
        if text.isascii():
            assert tok.tokenize(text) == tokenize.tokenize(text, porter.PorterStemmer())


def test_rouge_l_keeps_non_latin_text():
    from rouge_score import rouge_scorer

    # rouge_score's default tokenizer drops Hangul entirely: identical answers score 0 there
    assert rouge_scorer.RougeScorer(["rougeL"]).score("고양이가 있다", "고양이가 있다")["rougeL"].fmeasure == 0.0
    got = M.compute(["rouge_l"], ["고양이가 있다", "고양이가 있다", "我爱猫", "Café au lait"], [["고양이가 있다"], ["고양이가 없다"], ["我爱狗"], ["café noir"]])
    per = [1.0, 0.5, 2 / 3, 0.4]  # words; words; Han per character; accented Latin kept
    assert got["rouge_l"]["value"] == pytest.approx(np.mean(per), abs=1e-9)


def _lmms_eval_coco(preds, refs):
    """The COCO caption pipeline exactly as lmms-eval's coco_aggregation_result runs it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from vlmtune.eval.coco import _java_on_path, find_java

    gts = {i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)}
    res = {i: [{"caption": p}] for i, p in enumerate(preds)}
    with _java_on_path(find_java()[0]):
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
        out = {"METEOR": Meteor().compute_score(gts, res)[0]}
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{k + 1}": bleu[k] for k in range(4)})
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    return out


def test_coco_metrics_equal_pycocoevalcap_as_lmms_eval_runs_it(scores):
    ref = _lmms_eval_coco(PREDS, REFS)
    assert scores["meteor"]["value"] == pytest.approx(ref["METEOR"], abs=1e-6)
    assert scores["cider"]["value"] == pytest.approx(ref["CIDEr"], abs=1e-6)
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert scores["coco"]["value"][k] == pytest.approx(ref[k], abs=1e-6), k
    assert scores["meteor"]["ci95"] is not None and scores["cider"]["ci95"] is not None
    assert "document frequencies" in scores["cider"]["note"]


def test_cer_wer_equal_jiwer(scores):
    import jiwer

    first = [r[0] for r in REFS]
    assert scores["wer"]["value"] == pytest.approx(jiwer.wer(first, PREDS), abs=1e-6)
    assert scores["cer"]["value"] == pytest.approx(jiwer.cer(first, PREDS), abs=1e-6)
    empty_ref = M.compute(["wer"], ["x"], [[""]])["wer"]
    assert empty_ref["value"] is None and "empty" in empty_ref["reason"]


def test_token_stats_counts_words_and_tokens():
    class Tok:  # one token per character: easy to count by hand
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(t) for t in texts]}

    out = M.compute(["token_stats"], ["a bb", "ccc"], [["dd", "e f g"], ["h"]], tokenizer=Tok())["token_stats"]["value"]
    assert out["prediction_words_mean"] == 1.5 and out["prediction_words_median"] == 1.5
    assert out["reference_words_mean"] == pytest.approx(5 / 3) and out["reference_words_median"] == 1
    assert out["prediction_tokens_mean"] == 3.5 and out["reference_tokens_mean"] == pytest.approx((2 + 5 + 1) / 3)


def test_every_entry_names_its_implementation_and_version(scores):
    import sacrebleu

    for name, e in scores.items():
        assert e["implementation"] and isinstance(e["settings"], dict), name
    assert scores["bleu4"]["library_version"] == sacrebleu.__version__
    assert scores["meteor"]["library_version"] == "1.2"


@pytest.mark.parametrize("name", ["bleu4", "meteor", "cider", "coco", "cer", "wer", "rouge_l", "exact_match"])
def test_interval_aggregate_reproduces_the_value(name):
    """With every sample identical, every resample is the same multiset: the interval must
    collapse onto the library's value -- so each metric's resampling formula is the library's."""
    preds, refs = ["the cat sat on the red mat"] * 6, [["a cat sat on a red mat", "the cat is on the mat"]] * 6
    e = M.compute([name], preds, refs)[name]
    values = e["value"] if isinstance(e["value"], dict) else {"v": e["value"]}
    cis = e["ci95"] if isinstance(e["value"], dict) else {"v": e["ci95"]}
    for k, v in values.items():
        assert cis[k][0] == pytest.approx(v, abs=1e-9) and cis[k][1] == pytest.approx(v, abs=1e-9), (name, k)


def test_interval_is_a_real_bootstrap():
    rng = np.random.default_rng(0)
    hits = (rng.random(400) < 0.5).astype(float)
    p = hits.mean()
    lo, hi = Bootstrap().ci95(hits, mean_aggregate)
    half = 1.96 * np.sqrt(p * (1 - p) / 400)  # normal approximation of the same interval
    assert lo == pytest.approx(p - half, abs=0.01) and hi == pytest.approx(p + half, abs=0.01)
    assert Bootstrap().ci95(hits, mean_aggregate) == [lo, hi]  # fixed seed
    assert Bootstrap(seed=1).ci95(hits, mean_aggregate) != [lo, hi]


def test_no_java_gives_null_with_reason(monkeypatch):
    from vlmtune.eval import coco

    coco.find_java.cache_clear()
    monkeypatch.setenv("VLMTUNE_JAVA", "/nonexistent/java")
    try:
        out = M.compute(["meteor", "cider", "bleu4"], ["a"], [["a"]])
    finally:
        coco.find_java.cache_clear()
    assert out["meteor"]["value"] is None and "VLMTUNE_JAVA" in out["meteor"]["reason"]
    assert out["cider"]["value"] is None
    assert out["bleu4"]["value"] is not None


def test_unknown_metric_is_a_user_error():
    from vlmtune.errors import UserError

    with pytest.raises(UserError, match="did you mean 'rouge_l'"):
        M.compute(["rougel"], ["a"], [["a"]])

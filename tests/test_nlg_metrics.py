"""The E2E metrics against independent implementations of their formulas written here.

The expected values below are computed in this file from the definitions (clipped n-gram
precisions, LCS, NIST information weights, CIDEr-D tf-idf vectors) on hand-tokenized text; no
figure is copied from the code under test.
"""

from __future__ import annotations

import gc
import math
import re
import warnings
from collections import Counter

import numpy as np
import pytest

from experiments import nlg_metrics

# Two items with a different number of references: the first has two, the second one.
HYPS = ["The Vaults is a pub in the city centre.", "Cotto."]
REFS = [
    [
        "The Vaults is a pub in the centre of the city.",
        "In the city centre there is a pub, The Vaults.",
    ],
    ["Cotto is a cheap coffee shop."],
]
# The same texts lower-cased and tokenized by hand.
HYP_TOKENS = [
    "the vaults is a pub in the city centre .".split(),
    "cotto .".split(),
]
REF_TOKENS = [
    [
        "the vaults is a pub in the centre of the city .".split(),
        "in the city centre there is a pub , the vaults .".split(),
    ],
    ["cotto is a cheap coffee shop .".split()],
]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _reference_bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 (Papineni et al.): clipped counts, closest reference length, 0-100."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, group in zip(hyps, refs, strict=True):
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            max_ref = Counter()
            for ref in group:
                max_ref |= _ngrams(ref, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in group), key=lambda length: (abs(length - len(hyp)), length))
    assert all(matches), "the hand example must not need smoothing"
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = (
                table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
            )
    return table[-1][-1]


def _reference_rouge_l(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    best = []
    for hyp, group in zip(hyps, refs, strict=True):
        f1s = []
        for ref in group:
            lcs = _lcs(hyp, ref)
            f1s.append(0.0 if lcs == 0 else 2 * lcs / (len(hyp) + len(ref)))
        best.append(max(f1s))
    return 100 * sum(best) / len(best)


def _reference_nist(hyps: list[list[str]], refs: list[list[str]], n: int = 5) -> float:
    """NIST (Doddington, 2002) with a single reference per item."""
    counts: Counter = Counter()
    for ref in refs:
        for k in range(1, n + 1):
            counts.update(_ngrams(ref, k))
    words = sum(len(ref) for ref in refs)

    def info(gram: tuple[str, ...]) -> float:
        context = counts[gram[:-1]] if len(gram) > 1 else words
        return math.log2(context / counts[gram])

    total = 0.0
    for k in range(1, n + 1):
        gained = sum(
            info(g) * min(c, _ngrams(ref, k)[g])
            for hyp, ref in zip(hyps, refs, strict=True)
            for g, c in _ngrams(hyp, k).items()
            if g in counts
        )
        hyp_ngrams = sum(max(0, len(hyp) - k + 1) for hyp in hyps)
        total += gained / hyp_ngrams if hyp_ngrams else 0.0
    ratio = min(1.0, sum(map(len, hyps)) / sum(map(len, refs)))
    beta = math.log(0.5) / math.log(1.5) ** 2
    return total * math.exp(beta * math.log(ratio) ** 2)


def _reference_cider_d(
    hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D (Vedantam et al., 2015): tf-idf n-gram vectors, clipped, length-penalized."""
    num_items = len(hyps)
    doc_freq = [
        Counter(g for group in refs for g in set().union(*(_ngrams(r, k) for r in group)))
        for k in range(1, n + 1)
    ]
    scores = []
    for hyp, group in zip(hyps, refs, strict=True):
        per_order = []
        for k in range(1, n + 1):
            vocab = sorted(set(_ngrams(hyp, k)).union(*(_ngrams(r, k) for r in group)))
            idf = np.array([np.log(num_items) - np.log(max(1, doc_freq[k - 1][g])) for g in vocab])

            def vector(tokens: list[str], k: int = k, vocab: list = vocab, idf=idf) -> np.ndarray:
                counts = _ngrams(tokens, k)
                return np.array([counts[g] for g in vocab], dtype=float) * idf

            h = vector(hyp)
            sims = []
            for ref in group:
                r = vector(ref)
                norms = np.linalg.norm(h) * np.linalg.norm(r)
                cosine = float(np.minimum(h, r) @ r / norms) if norms > 0 else 0.0
                sims.append(cosine * math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2)))
            per_order.append(np.mean(sims))
        scores.append(10 * np.mean(per_order))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def meteor_scorer():
    with nlg_metrics.MeteorScorer() as scorer:
        yield scorer


def test_normalize_lowercases_and_splits_punctuation():
    assert (
        nlg_metrics.normalize("The Vaults, near  Café Rouge.") == "the vaults , near café rouge ."
    )
    assert (
        nlg_metrics.normalize("Rated 3.5; £20-25!\n(cheap)") == "rated 3.5 ; £20 - 25 ! ( cheap )"
    )
    assert [nlg_metrics.normalize(h).split() for h in HYPS] == HYP_TOKENS


def test_bleu_matches_the_formula_with_varying_reference_counts():
    expected = _reference_bleu(HYP_TOKENS, REF_TOKENS)
    assert nlg_metrics.bleu(HYPS, REFS) == pytest.approx(expected, abs=1e-9)
    # Padding the one-reference item with an empty reference would pick length 0 as the
    # closest length for the two-token "cotto ." and change the score; it must not happen.
    padded = [REF_TOKENS[0], [*REF_TOKENS[1], []]]
    assert _reference_bleu(HYP_TOKENS, padded) > expected + 1
    # Neither the order of the references nor their number elsewhere in the corpus matters.
    reordered = [REFS[0][::-1], REFS[1]]
    assert nlg_metrics.bleu(HYPS, reordered) == pytest.approx(expected, abs=1e-9)
    assert nlg_metrics.bleu(HYPS[::-1], REFS[::-1]) == pytest.approx(expected, abs=1e-9)


def test_perfect_output_scores_100_on_bleu_and_rouge_l():
    hyps = [REFS[0][1], REFS[1][0]]
    assert nlg_metrics.bleu(hyps, REFS) == pytest.approx(100.0)
    assert nlg_metrics.rouge_l(hyps, REFS) == pytest.approx(100.0)


def test_rouge_l_matches_lcs_f1_best_reference():
    hyps = [*HYPS, "A pub, cheap and in the riverside area."]
    refs = [*REFS, ["The pub is cheap.", "A cheap pub in the riverside area, The Mill."]]
    hyp_tokens = [*HYP_TOKENS, "a pub , cheap and in the riverside area .".split()]
    ref_tokens = [
        *REF_TOKENS,
        ["the pub is cheap .".split(), "a cheap pub in the riverside area , the mill .".split()],
    ]
    expected = _reference_rouge_l(hyp_tokens, ref_tokens)
    assert nlg_metrics.rouge_l(hyps, refs) == pytest.approx(expected, abs=1e-9)
    # Punctuation is a token here (rouge_score's own tokenizer would drop it).
    assert nlg_metrics.rouge_l(["a pub ."], [["a pub"]]) == pytest.approx(100 * 2 * 2 / 5)


def test_nist_matches_the_formula_with_single_references():
    hyps = ["The Vaults is a pub in the city centre.", "Cotto is cheap, near the river."]
    refs = [["The Vaults is a pub in the centre of the city."], ["Cotto is cheap."]]
    hyp_tokens = [nlg_metrics.normalize(h).split() for h in hyps]
    ref_tokens = [nlg_metrics.normalize(g[0]).split() for g in refs]
    short = (["The Vaults is a pub."], [refs[0]])  # shorter than its reference: length penalty
    short_expected = _reference_nist([hyp_tokens[0][:5] + ["."]], [ref_tokens[0]])
    assert nlg_metrics.nist(hyps, refs) == pytest.approx(_reference_nist(hyp_tokens, ref_tokens))
    assert nlg_metrics.nist(*short) == pytest.approx(short_expected)
    assert 0 < short_expected < _reference_nist([ref_tokens[0]], [ref_tokens[0]])


def test_nist_of_outputs_shorter_than_n():
    hyps, refs = ["Cotto.", "A pub."], [["Cotto is cheap."], ["It is a pub."]]
    tokens = [nlg_metrics.normalize(h).split() for h in hyps]
    ref_tokens = [nlg_metrics.normalize(g[0]).split() for g in refs]
    assert nlg_metrics.nist(hyps, refs) == pytest.approx(_reference_nist(tokens, ref_tokens))
    assert nlg_metrics.nist(["", " "], refs) == 0.0


def test_cider_matches_an_independent_cider_d():
    hyps = [
        "The pub the pub is a pub near the river.",  # repeated n-grams: clipping matters
        "Cotto is a cheap coffee shop.",
        "Zizzi serves Italian food in the city centre and is family friendly.",
    ]
    refs = [
        ["The Mill is a pub near the river.", "Near the river there is a pub called The Mill."],
        ["Cotto is a cheap coffee shop near The Portland Arms.", "A cheap coffee shop: Cotto."],
        ["Zizzi is a family-friendly Italian restaurant in the city centre.", "Zizzi, Italian."],
    ]
    hyp_tokens = [nlg_metrics.normalize(h).split() for h in hyps]
    ref_tokens = [[nlg_metrics.normalize(r).split() for r in group] for group in refs]
    # pycocoevalcap measures length as the bigram count; the difference of two lengths is the
    # same as in words while no text is empty, which holds here.
    assert all(hyp_tokens) and all(all(group) for group in ref_tokens)
    expected = _reference_cider_d(hyp_tokens, ref_tokens)
    assert 0.5 < expected < 10
    assert nlg_metrics.cider(hyps, refs) == pytest.approx(expected, rel=1e-9)


def test_meteor_orders_outputs_and_normalizes(meteor_scorer):
    refs = [["The Vaults is a pub in the city centre."]]
    exact = nlg_metrics.meteor(["The Vaults is a pub in the city centre."], refs, meteor_scorer)
    partial = nlg_metrics.meteor(["The Vaults is in the north."], refs, meteor_scorer)
    assert exact == pytest.approx(100.0)
    assert 0 < partial < exact <= 100
    assert nlg_metrics.meteor(["The Vaults."], [["the vaults ."]], meteor_scorer) == (
        pytest.approx(nlg_metrics.meteor(["the vaults ."], [["the vaults ."]], meteor_scorer))
    )
    assert meteor_scorer(["The Vaults."], [["the vaults ."]]) == pytest.approx(100.0)


def test_meteor_survives_odd_characters(meteor_scorer):
    refs = [["The Vaults is a pub."], ["Café Rouge, £20-25."], ["Cotto is cheap."]]
    odd = ["The ||| Vaults | is a pub.", "Café\nRouge,\r\n£20-25.\t\x0b", ""]
    value = nlg_metrics.meteor(odd, refs, meteor_scorer)
    assert 0 < value < 100
    # The process still answers in step afterwards.
    clean = ["The Vaults is a pub.", "Café Rouge, £20-25.", "Cotto is cheap."]
    assert nlg_metrics.meteor(clean, refs, meteor_scorer) == pytest.approx(100.0)


def test_meteor_without_a_scorer_starts_and_closes_one(monkeypatch, meteor_scorer):
    made = []

    class Shared:
        closed = False

        def __enter__(self):
            made.append(self)
            return meteor_scorer

        def __exit__(self, *exc_info):
            self.closed = True

    monkeypatch.setattr(nlg_metrics, "MeteorScorer", Shared)
    assert nlg_metrics.meteor(["the vaults ."], [["The Vaults."]]) == pytest.approx(100.0)
    assert len(made) == 1 and made[0].closed


def test_meteor_process_is_closed_without_resource_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = nlg_metrics.MeteorScorer()
        scorer.close()
        scorer.close()
        with pytest.raises(RuntimeError, match="closed"):
            scorer(["a"], [["a"]])
        forgotten = nlg_metrics.MeteorScorer()  # never closed: the finalizer must do it
        del forgotten, scorer
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_meteor_reports_a_dead_process():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = nlg_metrics.MeteorScorer()
        scorer._meteor.meteor_p.kill()
        with pytest.raises(RuntimeError, match="METEOR process failed"):
            scorer(["a"], [["a"]])
        with pytest.raises(RuntimeError, match="closed"):
            scorer(["a"], [["a"]])
        del scorer
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_score_reports_all_five_consistently(meteor_scorer):
    scores = nlg_metrics.score(HYPS, REFS, meteor_scorer)
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert list(scores) == list(nlg_metrics.METRICS)
    assert scores["BLEU"] == pytest.approx(_reference_bleu(HYP_TOKENS, REF_TOKENS))
    assert scores["ROUGE_L"] == pytest.approx(_reference_rouge_l(HYP_TOKENS, REF_TOKENS))
    assert scores["NIST"] == nlg_metrics.nist(HYPS, REFS)
    assert scores["CIDEr"] == pytest.approx(_reference_cider_d(HYP_TOKENS, REF_TOKENS))
    assert scores["METEOR"] == nlg_metrics.meteor(HYPS, REFS, meteor_scorer)
    assert all(isinstance(v, float) for v in scores.values())


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a", "b"], [["a"]], "hypotheses and references differ in length: 2 != 1"),
        (["a", "b"], [["a"], []], "references[1] is empty"),
        (["a"], [[" "]], "references[0] contains a blank reference"),
        (["a"], ["a"], "references[0] must be a list of strings"),
        ("ab", [["a"], ["b"]], "hypotheses must be a sequence of strings"),
        ([], [], "hypotheses is empty"),
    ],
)
@pytest.mark.parametrize("metric", ["bleu", "nist", "rouge_l", "cider", "meteor", "score"])
def test_bad_arguments_raise_value_errors_naming_them(metric, hyps, refs, message):
    # Checked before any Java process starts, so the "meteor" and "score" cases are cheap.
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(nlg_metrics, metric)(hyps, refs)

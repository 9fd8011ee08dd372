"""Corpus-level BLEU, NIST, METEOR, ROUGE-L and CIDEr with several references per output.

These are implementations of the five E2E NLG Challenge metrics built from standard
libraries, **not** the official ``e2e-metrics`` scripts (github.com/tuetschek/e2e-metrics),
which compute BLEU and NIST with the Perl ``mteval-v13a`` and the other three with the
MS-COCO caption evaluator after Stanford PTB tokenization. Each figure here comes from:

* ``BLEU``: ``sacrebleu`` corpus BLEU (4-grams, closest-reference brevity penalty, the
  mteval-style ``exp`` smoothing that only acts on a zero n-gram count), 0-100 scale.
* ``NIST``: ``nltk.translate.nist_score.corpus_nist`` with ``n=5``.
* ``METEOR``: METEOR 1.5 through ``pycocoevalcap.meteor.Meteor`` (Java, ``-l en -norm``),
  corpus score from the summed statistics, times 100.
* ``ROUGE_L``: ``rouge_score`` LCS F-measure (beta 1), the best reference per output, averaged
  over outputs, times 100.
* ``CIDEr``: ``pycocoevalcap.cider.Cider`` (that is CIDEr-D: idf from the references of the
  scored corpus, clipped counts, Gaussian length penalty with sigma 6, times 10), raw scale.

As ``e2e-metrics`` does, every text is lower-cased and tokenized first, here by one rule for
all five metrics (:func:`normalize`: the ``mteval-v13a`` tokenization, which splits punctuation
off words). Unlike the official COCO side, punctuation tokens are kept, not deleted.

Measured against the official scripts (``e2e-metrics`` at 1b9c4d8, Perl mteval-v13a-sig and
the COCO evaluator with its PTB tokenizer) on the 616 test MRs with two or more references,
scoring the first reference against the others ("human") and a fixed template ("template"):

=========  ===============  ==================
metric     human: here/off  template: here/off
=========  ===============  ==================
BLEU       60.46 / 60.46    54.51 / 54.51
NIST       7.86 / 8.90      6.15 / 7.44
METEOR     45.09 / 45.63    43.16 / 43.35
ROUGE_L    62.87 / 63.81    60.79 / 63.21
CIDEr      1.78 / 1.86      1.92 / 1.99
=========  ===============  ==================

BLEU agrees. nltk's NIST is about 1 lower: it scores each output against its single best
reference where mteval clips against all of them. The official ROUGE_L (pycocoevalcap's
``Rouge``) is an F-measure with beta 1.2 of the best precision and the best recall over the
references, not the best F1; that, more than tokenization, explains its gap. METEOR and CIDEr
differ by the punctuation the COCO side deletes.

Example:
    >>> refs = [["The Vaults is a pub.", "A pub: The Vaults."], ["Cotto is cheap."]]
    >>> round(bleu(["the vaults is a pub .", "Cotto is cheap."], refs), 1)
    100.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
"""The keys of :func:`score`, in the order the E2E papers report them."""

_TOKENIZE = Tokenizer13a()


def normalize(text: str) -> str:
    """Lower-cases and tokenizes a text as ``mteval-v13a`` does; whitespace becomes one space.

    Example:
        >>> normalize("The Vaults, near  Café Rouge.\\nPrices £20-25.")
        'the vaults , near café rouge . prices £20 - 25 .'
    """
    return " ".join(_TOKENIZE(text.lower()).split())


def _prepare(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Checks the arguments and normalizes every text."""
    if isinstance(hypotheses, str) or not all(isinstance(h, str) for h in hypotheses):
        raise ValueError("hypotheses must be a sequence of strings, one per output")
    if isinstance(references, str):
        raise ValueError("references must be a sequence of reference lists, not a string")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references differ in length: {len(hypotheses)} != {len(references)}"
        )
    if not hypotheses:
        raise ValueError("hypotheses is empty: nothing to score")
    hyps = [normalize(h) for h in hypotheses]
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str) or not all(isinstance(r, str) for r in group):
            raise ValueError(f"references[{i}] must be a list of strings, got {group!r}")
        norm = [normalize(r) for r in group]
        if not norm:
            raise ValueError(f"references[{i}] is empty: every output needs a reference")
        if not all(norm):
            raise ValueError(f"references[{i}] contains a blank reference: {list(group)!r}")
        refs.append(norm)
    return hyps, refs


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 on the 0-100 scale, by ``sacrebleu``.

    Outputs may have different numbers of references: sacrebleu takes one stream per
    reference position, and a missing reference is passed as ``None``, which it drops, so
    neither the clipped counts nor the closest reference length see a padding reference.

    Args:
        hypotheses: One system output per item.
        references: For each item, its non-empty list of human references.

    Example:
        >>> round(bleu(["a b c d e"], [["a b c d e f", "x"]]), 2)  # brevity penalty exp(1-6/5)
        81.87
    """
    hyps, refs = _prepare(hypotheses, references)
    streams = [
        [group[k] if k < len(group) else None for group in refs] for k in range(max(map(len, refs)))
    ]
    return float(BLEU(tokenize="none", force=True).corpus_score(hyps, streams).score)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST by ``nltk`` (information-weighted n-gram precisions, n-grams up to ``n``).

    nltk scores each output against its single best reference and takes the length penalty
    from that reference, where ``mteval`` clips counts against all references at once and uses
    the average reference length, so the two differ somewhat. An n-gram order no output is
    long enough for contributes 0 (as in ``mteval``) instead of dividing by zero.

    Example:
        >>> # info: a 1 bit, b and c 2 bits, "a b" and "a c" 1 bit; (1+2+1+2)/4 + (1+1)/2
        >>> nist(["a b", "a c"], [["a b"], ["a c"]], n=2)
        2.5
    """
    hyps, refs = _prepare(hypotheses, references)
    hyp_tokens = [h.split() for h in hyps]
    order = min(n, max(map(len, hyp_tokens)))
    if order == 0:
        return 0.0
    ref_tokens = [[r.split() for r in group] for group in refs]
    return float(corpus_nist(ref_tokens, hyp_tokens, n=order))


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over outputs of the best-reference ROUGE-L F1 (``rouge_score``), times 100.

    Example:
        >>> round(rouge_l(["a b c d"], [["a x c d", "q"]]), 2)  # LCS 3 of 4 and 4 tokens
        75.0
    """
    hyps, refs = _prepare(hypotheses, references)
    scorer = RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    best = [
        scorer.score_multi(group, h)["rougeL"].fmeasure for h, group in zip(hyps, refs, strict=True)
    ]
    return 100.0 * sum(best) / len(best)


class _WhitespaceTokenizer:
    """Makes ``rouge_score`` split the already-normalized texts on spaces only."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D by ``pycocoevalcap`` (raw scale, about 0-10).

    The idf weights come from the references of the scored corpus itself, so the figure
    depends on which items are scored together; a one-item corpus always scores 0.

    Example:
        >>> # cosine 1 for 1- and 2-grams, no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4
        >>> round(cider(["a pub", "a cafe"], [["a pub"], ["a cafe"]]), 4)
        5.0
    """
    hyps, refs = _prepare(hypotheses, references)
    value, _ = Cider().compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)})
    return float(value)


class MeteorScorer:
    """One METEOR 1.5 Java process (``pycocoevalcap``), closed cleanly; a context manager.

    Starting the JVM and loading the paraphrase table takes about ten seconds, so keep one
    scorer for many calls. ``|`` (METEOR's field separator) is replaced by ``¦`` and line breaks
    are already gone after :func:`normalize`.

    Example:
        >>> with MeteorScorer() as scorer:  # doctest: +SKIP
        ...     scorer(["the vaults is a pub ."], [["The Vaults is a pub."]])
        100.0
    """

    def __init__(self) -> None:
        self._meteor: _ClosingMeteor | None = _ClosingMeteor()

    def __call__(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """The corpus METEOR score times 100."""
        if self._meteor is None:
            raise RuntimeError("this MeteorScorer is closed")
        hyps, refs = _prepare(hypotheses, references)
        gts = {i: [_meteor_safe(r) for r in group] for i, group in enumerate(refs)}
        res = {i: [_meteor_safe(h)] for i, h in enumerate(hyps)}
        try:
            value, _ = self._meteor.compute_score(gts, res)
        except (ValueError, OSError) as err:  # an empty line read back or a broken pipe
            code = self._meteor.meteor_p.wait()
            self.close()
            raise RuntimeError(f"the METEOR process failed (exit code {code})") from err
        return 100.0 * float(value)

    def close(self) -> None:
        """Ends the Java process and closes its pipes; safe to call twice."""
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _meteor_safe(text: str) -> str:
    return text.replace("|", "¦")


class _ClosingMeteor(Meteor):
    """``Meteor`` whose process is waited for and whose three pipes are all closed."""

    def close(self) -> None:
        proc = self.meteor_p
        with contextlib.suppress(BrokenPipeError):  # unsent input to a process that died
            proc.stdin.close()
        if proc.poll() is None:
            proc.kill()  # nothing to flush; a JVM still loading its tables would take seconds
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def __del__(self) -> None:  # the parent's __del__ leaves stdout and stderr open
        if getattr(self, "meteor_p", None) is not None:
            self.close()


def meteor(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    scorer: MeteorScorer | None = None,
) -> float:
    """Corpus METEOR times 100; starts (and closes) a JVM unless ``scorer`` is given.

    Example:
        >>> meteor(["The Vaults."], [["the vaults ."]])  # doctest: +SKIP
        100.0
    """
    if scorer is not None:
        return scorer(hypotheses, references)
    _prepare(hypotheses, references)  # fail before starting Java
    with MeteorScorer() as own:
        return own(hypotheses, references)


def score(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """All five E2E metrics: ``BLEU``, ``NIST``, ``METEOR``, ``ROUGE_L`` and ``CIDEr``.

    Args:
        hypotheses: One system output per MR.
        references: For each MR, its human references (any number, at least one).
        meteor_scorer: A running :class:`MeteorScorer` to reuse; by default one is started
            and closed inside the call.

    Returns:
        BLEU, METEOR and ROUGE_L on the 0-100 scale, NIST and CIDEr raw (the scales of the
        E2E and LoRA paper tables).

    Raises:
        ValueError: If the two lengths differ, a reference list is empty, or an argument is
            not a sequence of strings; the message names the argument.

    Example:
        >>> score(["The Vaults is a pub."], [["the vaults is a pub ."]])  # doctest: +SKIP
        {'BLEU': 100.0, 'NIST': ..., 'METEOR': 100.0, 'ROUGE_L': 100.0, 'CIDEr': 0.0}
    """
    _prepare(hypotheses, references)
    return {
        "BLEU": bleu(hypotheses, references),
        "NIST": nist(hypotheses, references),
        "METEOR": meteor(hypotheses, references, meteor_scorer),
        "ROUGE_L": rouge_l(hypotheses, references),
        "CIDEr": cider(hypotheses, references),
    }

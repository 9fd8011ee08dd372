"""Seeds, learning-rate selection and intervals for a sweep's ``results.jsonl``.

Each record of a sweep is one (configuration, seed, learning rate) run. This module

- picks one learning rate per configuration (``run``: method, targets, rank) from the
  **validation** metric averaged over seeds (:func:`select_lrs`; it never reads test metrics),
- summarises the picked runs across seeds as the mean and a 95% Student-t confidence
  interval, or the min–max range when fewer than :data:`T_MIN_SEEDS` seeds finished
  (:func:`interval`, :func:`aggregate`),
- and says whether two configurations differ by more than their seed-to-seed spread
  (:func:`separated`: their intervals do not overlap).

Example:
    >>> interval([0.5, 0.75, 1.0])
    Interval(n=3, mean=0.75, lo=0.5, hi=1.0, kind='min-max')
    >>> separated(interval([0.70, 0.71, 0.72]), interval([0.73, 0.75, 0.74]))
    True
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

T_MIN_SEEDS = 5
"""From this many seeds on, :func:`interval` is a t-interval; below it, the min–max range."""
HIGHER_IS_BETTER = {"pearson": True, "acc3": True, "mse": False, "loss": False, "BLEU": True,
                    "NIST": True, "METEOR": True, "ROUGE_L": True, "CIDEr": True}
METRICS = ("pearson", "mse", "acc3")
"""The sweep's metrics; another experiment passes its own to :func:`aggregate`."""


class Interval(NamedTuple):
    """A metric across seeds: ``mean`` and the interval ``[lo, hi]``.

    ``kind`` is ``"t95"`` (mean ± t₀.₉₇₅,ₙ₋₁·s/√n), ``"min-max"`` (n < :data:`T_MIN_SEEDS`) or
    ``"single"`` (n = 1, ``lo == hi == mean``).
    """

    n: int
    mean: float
    lo: float
    hi: float
    kind: str

    def __str__(self) -> str:
        if self.n == 1:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(t_quantile(2), 3), round(t_quantile(9), 3)
        (4.303, 2.262)
    """
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (or their min–max for fewer than 5 values).

    Non-finite values (a diverged run) make the mean and interval NaN rather than vanish.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, mean, mean, "single")
    if n < T_MIN_SEEDS:
        return Interval(n, mean, min(values), max(values), "min-max")
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, "t95")


def separated(a: Interval, b: Interval) -> bool:
    """Whether ``a`` and ``b`` differ by more than their spread (the intervals are disjoint)."""
    return a.hi < b.lo or b.hi < a.lo


def _score(value: Any, higher: bool) -> float:
    value = float(value)
    if not math.isfinite(value):
        return -math.inf
    return value if higher else -value


def lr_scores(records: Iterable[dict], metric: str = "pearson") -> dict[str, dict[float, float]]:
    """``{run: {lr: mean validation metric over its seeds}}`` (NaN where a seed diverged).

    Reads only ``run``, ``lr`` and ``val`` of each record.
    """
    values: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        values[r["run"]][float(r["lr"])].append(float(r["val"][metric]))
    return {run: {lr: math.fsum(v) / len(v) for lr, v in sorted(by_lr.items())}
            for run, by_lr in values.items()}


def select_lrs(records: Iterable[dict], metric: str = "pearson") -> dict[str, float]:
    """The learning rate of each ``run`` with the best mean **validation** ``metric``.

    Test metrics are never read: only each record's ``run``, ``lr`` and ``val`` are passed on.
    Ties go to the smaller learning rate; a learning rate with a diverged (non-finite) seed
    loses to every finite one.

    Example:
        >>> recs = [{"run": "a", "lr": lr, "seed": s, "val": {"pearson": v}}
        ...         for lr, s, v in [(1e-3, 0, 0.5), (1e-3, 1, 0.7), (3e-3, 0, 0.61),
        ...                          (3e-3, 1, 0.61)]]
        >>> select_lrs(recs)
        {'a': 0.003}
    """
    higher = HIGHER_IS_BETTER[metric]
    visible = ({"run": r["run"], "lr": r["lr"], "val": r["val"]} for r in records)
    chosen = {}
    for run, by_lr in lr_scores(visible, metric).items():
        chosen[run] = max(sorted(by_lr), key=lambda lr, s=by_lr: _score(s[lr], higher))
    return chosen


class Row(NamedTuple):
    """One configuration at its chosen learning rate, summarised across seeds."""

    run: str
    method: str
    targets: str | None
    rank: int | None
    trainable_params: int
    lr: float
    seeds: tuple[int, ...]
    test: dict[str, Interval]
    val: dict[str, Interval]
    lr_scores: dict[float, float]


def aggregate(records: Sequence[dict], metric: str = "pearson",
              metrics: Sequence[str] = METRICS) -> list[Row]:
    """One :class:`Row` per ``run`` (in first-seen order), at the learning rate picked on
    validation ``metric``; test metrics (``metrics``, each in every record's ``test`` and
    ``val``) are those of the picked learning rate's seeds only.
    """
    chosen = select_lrs(records, metric)
    scores = lr_scores(records, metric)
    rows = []
    for run in dict.fromkeys(r["run"] for r in records):
        picked = sorted((r for r in records if r["run"] == run and float(r["lr"]) == chosen[run]),
                        key=lambda r: r["seed"])
        first = picked[0]
        rows.append(Row(
            run=run, method=first["method"], targets=first["targets"], rank=first["rank"],
            trainable_params=first["trainable_params"], lr=chosen[run],
            seeds=tuple(r["seed"] for r in picked),
            test={m: interval([r["test"][m] for r in picked]) for m in metrics},
            val={m: interval([r["val"][m] for r in picked]) for m in metrics
                 if all(m in r["val"] for r in picked)},
            lr_scores=scores[run],
        ))
    return rows


def chosen_records(records: Sequence[dict], metric: str = "pearson") -> list[dict]:
    """The records at each run's chosen learning rate (every seed), in their order."""
    chosen = select_lrs(records, metric)
    return [r for r in records if float(r["lr"]) == chosen[r["run"]]]


def results_table(rows: Sequence[Row]) -> str:
    """The markdown table of :func:`aggregate`'s rows: mean [interval] per metric."""
    header = ("| run | method | targets | rank | trainable params | lr (picked on val) | seeds | "
              "test pearson | test mse | test acc3 | val pearson |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        t = r.test
        lines.append(
            f"| {r.run} | {r.method} | {r.targets or '-'} | {r.rank or '-'} | "
            f"{r.trainable_params:,} | {r.lr:g} | {len(r.seeds)} | {t['pearson']} | {t['mse']} | "
            f"{t['acc3']} | {r.val['pearson']} |"
        )
    return "\n".join(lines)


def lr_table(rows: Sequence[Row]) -> str:
    """Mean validation Pearson of every learning rate tried, the picked one in bold."""
    lines = ["| run | mean val pearson per lr (picked in bold) |", "|---|---|"]
    for r in rows:
        cells = [(f"**{lr:g}: {v:.4f}**" if lr == r.lr else f"{lr:g}: {v:.4f}")
                 for lr, v in r.lr_scores.items()]
        lines.append(f"| {r.run} | {'; '.join(cells)} |")
    return "\n".join(lines)


def report(rows: Sequence[Row]) -> str:
    """``results.md``: the results table, how its intervals read, and the lr-selection table."""
    n = sorted({len(r.seeds) for r in rows})
    kinds = sorted({r.test["pearson"].kind for r in rows})
    note = {"single": "one seed: no interval", "min-max": "[min, max] over seeds",
            "t95": "95% Student-t confidence interval over seeds"}
    return (
        f"Test metrics at each run's learning rate picked on validation Pearson (mean over "
        f"seeds); seeds per run: {', '.join(map(str, n))}; brackets: "
        f"{'; '.join(note[k] for k in kinds)}.\n\n{results_table(rows)}\n\n"
        f"Learning-rate selection (validation split only):\n\n{lr_table(rows)}\n"
    )

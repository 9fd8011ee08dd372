"""The training-budget axis of a sweep: per-budget selection, the budget table, the paired gap.

A sweep run with several ``--steps`` budgets holds one record per (configuration, seed, lr,
budget); each budget is its own run with its own warmup + cosine schedule. This module

- picks each configuration's learning rate per budget on **validation** only
  (:func:`select_lrs`, which hands :func:`experiments.stats.select_lrs` one budget's records),
- summarises every budget with :func:`experiments.stats.aggregate` (:func:`aggregate`),
- and writes the budget section of ``results.md`` (:func:`report`): each configuration's test
  metric per budget with its picked lr, the paired gap of full fine-tuning over each adapter
  configuration per budget (same seed, each side at its own picked lr) with the per-seed
  differences, and the wall time per budget.

Records written before the budget axis carry their step count in ``record["config"]["steps"]``
(:func:`steps_of` reads either).

Example:
    >>> recs = [{"run": "a", "lr": lr, "seed": 0, "steps": s, "val": {"pearson": v}}
    ...         for s, lr, v in [(10, 1e-3, 0.5), (10, 3e-3, 0.6), (40, 1e-3, 0.7),
    ...                          (40, 3e-3, 0.4)]]
    >>> select_lrs(recs)
    {(10, 'a'): 0.003, (40, 'a'): 0.001}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from experiments import stats

BASELINE_REFERENCE = "full"
"""The configuration every adapter configuration's gap is measured against."""


def steps_of(record: dict) -> int:
    """The record's optimizer-step budget (``steps``, else its saved config's ``steps``).

    Example:
        >>> steps_of({"steps": 400}), steps_of({"config": {"steps": 100}})
        (400, 100)
    """
    if "steps" in record:
        return int(record["steps"])
    return int(record["config"]["steps"])


def by_budget(records: Sequence[dict]) -> dict[int, list[dict]]:
    """The records of each budget, budgets ascending, each in the records' order."""
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(steps_of(r), []).append(r)
    return dict(sorted(out.items()))


def select_lrs(records: Sequence[dict], metric: str = "pearson") -> dict[tuple[int, str], float]:
    """``{(budget, run): lr}``: each configuration's lr picked on validation, per budget.

    Only each record's ``run``, ``lr``, budget and ``val`` are read; test metrics never are.
    """
    chosen = {}
    for steps, group in by_budget(records).items():
        visible = [{"run": r["run"], "lr": r["lr"], "val": r["val"]} for r in group]
        chosen.update({(steps, run): lr for run, lr in stats.select_lrs(visible, metric).items()})
    return chosen


def aggregate(records: Sequence[dict], metric: str = "pearson") -> dict[int, list[stats.Row]]:
    """``{budget: rows}``: :func:`experiments.stats.aggregate` of each budget's records."""
    return {s: stats.aggregate(group, metric) for s, group in by_budget(records).items()}


def chosen_records(records: Sequence[dict], metric: str = "pearson") -> list[dict]:
    """The records at their (configuration, budget)'s picked lr (every seed), in order."""
    chosen = select_lrs(records, metric)
    return [r for r in records if float(r["lr"]) == chosen[steps_of(r), r["run"]]]


def paired_gaps(records: Sequence[dict], metric: str = "pearson", split: str = "test",
                reference: str = BASELINE_REFERENCE) -> dict[int, dict[str, dict[int, float]]]:
    """``{budget: {run: {seed: reference - run}}}`` on ``split``'s ``metric``, each side at its
    own lr picked on validation for that budget, paired by seed (seeds both sides finished).

    Only adapter configurations (records with a rank) are compared; a budget without a
    finished ``reference`` run is left out.
    """
    picked = chosen_records(records, metric)
    gaps: dict[int, dict[str, dict[int, float]]] = {}
    for steps, group in by_budget(picked).items():
        ref = {r["seed"]: float(r[split][metric]) for r in group if r["run"] == reference}
        if not ref:
            continue
        per_run: dict[str, dict[int, float]] = {}
        for r in group:
            if r.get("rank") is not None and r["seed"] in ref:
                per_run.setdefault(r["run"], {})[r["seed"]] = ref[r["seed"]] - float(
                    r[split][metric])
        gaps[steps] = {run: dict(sorted(d.items())) for run, d in per_run.items()}
    return gaps


def _epochs(steps: int, batch_size: int | None, train_size: int | None) -> str:
    if not batch_size or not train_size:
        return ""
    return f" ({steps * batch_size / train_size:.2g} ep)"


def _batch_and_train(records: Sequence[dict]) -> tuple[int | None, int | None]:
    first = records[0]
    return first.get("config", {}).get("batch_size"), first.get("train_size")


def budget_table(rows: dict[int, list[stats.Row]], metric: str = "pearson",
                 batch_size: int | None = None, train_size: int | None = None) -> str:
    """Each configuration's test ``metric`` (mean [interval] over seeds) and its picked lr, one
    column per budget."""
    budgets = list(rows)
    runs = list(dict.fromkeys(r.run for rs in rows.values() for r in rs))
    cells = {(s, r.run): r for s, rs in rows.items() for r in rs}
    head = [f"{s} steps{_epochs(s, batch_size, train_size)}" for s in budgets]
    lines = ["| run | " + " | ".join(head) + " |", "|---|" + "---|" * len(budgets)]
    for run in runs:
        out = []
        for s in budgets:
            row = cells.get((s, run))
            seeds = f"{len(row.seeds)} seed{'s' if len(row.seeds) > 1 else ''}" if row else ""
            out.append(f"{row.test[metric]} (lr {row.lr:g}, {seeds})" if row else "-")
        lines.append(f"| {run} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def gap_table(gaps: dict[int, dict[str, dict[int, float]]],
              reference: str = BASELINE_REFERENCE) -> str:
    """The paired gap ``reference - run`` per budget: mean [interval] and each seed's value."""
    lines = [f"| budget (steps) | {reference} minus | gap mean [interval] | per seed |",
             "|---|---|---|---|"]
    for steps, per_run in gaps.items():
        for run, by_seed in per_run.items():
            seeds = "; ".join(f"s{s}: {d:+.4f}" for s, d in by_seed.items())
            gap = stats.interval(list(by_seed.values()))
            sign = "+" if gap.mean >= 0 else ""
            lines.append(f"| {steps} | {run} | {sign}{gap} | {seeds} |")
    return "\n".join(lines)


def wall_table(records: Sequence[dict]) -> str:
    """Wall time per budget: every run of it summed (all lrs and seeds) and, per
    configuration, the mean of one run and its median step time."""
    lines = ["| budget (steps) | runs | wall summed (min) | mean wall per run (s), by "
             "configuration | median step time (ms), by configuration |", "|---|---|---|---|---|"]
    for steps, group in by_budget(records).items():
        runs = list(dict.fromkeys(r["run"] for r in group))
        walls, step_ms = [], []
        for run in runs:
            mine = [r for r in group if r["run"] == run]
            walls.append(f"{run} {math.fsum(r['wall_s'] for r in mine) / len(mine):.0f}")
            times = sorted(r["step_time_s"] for r in mine if r.get("step_time_s"))
            if times:
                step_ms.append(f"{run} {1e3 * times[len(times) // 2]:.0f}")
        total = math.fsum(r["wall_s"] for r in group) / 60
        lines.append(f"| {steps} | {len(group)} | {total:.1f} | {'; '.join(walls)} | "
                     f"{'; '.join(step_ms)} |")
    return "\n".join(lines)


def report(records: Sequence[dict], metric: str = "pearson") -> str:
    """The budget section of ``results.md``: budget table, paired gaps, wall time."""
    rows = aggregate(records, metric)
    batch_size, train_size = _batch_and_train(records)
    n = sorted({len(r.seeds) for rs in rows.values() for r in rs})
    kinds = sorted({r.test[metric].kind for rs in rows.values() for r in rs})
    note = {"single": "one seed: no interval", "min-max": "[min, max] over seeds",
            "t95": "95% Student-t confidence interval over seeds"}
    text = (
        f"## Test {metric} per training budget\n\nEach budget is its own run (warmup + cosine "
        f"over its steps); each configuration's lr is picked on validation {metric} per budget "
        f"(mean over seeds) and only end-of-run metrics are used. Seeds per cell: "
        f"{', '.join(map(str, n))}; brackets: {'; '.join(note[k] for k in kinds)}.\n\n"
        f"{budget_table(rows, metric, batch_size, train_size)}\n"
    )
    gaps = paired_gaps(records, metric)
    if any(gaps.values()):
        text += (
            f"\n## Paired gap: {BASELINE_REFERENCE} minus each adapter configuration\n\n"
            f"Test {metric}, same seed on both sides (same head initialisation and batch "
            f"order), each at its own lr picked on validation for that budget; positive: "
            f"{BASELINE_REFERENCE} is ahead.\n\n{gap_table(gaps)}\n"
        )
    return text + f"\n## Wall time per budget\n\n{wall_table(records)}\n"

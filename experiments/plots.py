"""Plots of a sweep's results (matplotlib, written as PNG files).

Every point is a configuration at its learning rate picked on validation: the mean over seeds,
with error bars (baselines: a shaded band) spanning the interval of
:func:`experiments.stats.interval` (min–max below 5 seeds, else a 95% t-interval).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.stats import Interval, Row  # noqa: E402

BASELINE_STYLE = {"head": ("tab:gray", ":"), "full": ("black", "--")}


def _groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    groups = defaultdict(list)
    for r in rows:
        if r.rank is not None:
            groups[f"{r.method} {r.targets}"].append(r)
    return {k: sorted(v, key=lambda r: r.rank) for k, v in groups.items()}


def _baselines(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.rank is None]


def _yerr(intervals: list[Interval]) -> np.ndarray:
    return np.array([[i.mean - i.lo for i in intervals], [i.hi - i.mean for i in intervals]])


def _label(r: Row) -> str:
    return f"{r.run} (lr {r.lr:g})"


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _baseline_bands(ax, rows: Sequence[Row], metric: str) -> None:
    for r in _baselines(rows):
        color, style = BASELINE_STYLE.get(r.method, ("tab:red", "-."))
        i = r.test[metric]
        ax.axhline(i.mean, color=color, linestyle=style, label=_label(r))
        if i.hi > i.lo:
            ax.axhspan(i.lo, i.hi, color=color, alpha=0.12)


def _seeds_note(rows: Sequence[Row]) -> str:
    n = sorted({len(r.seeds) for r in rows})
    kind = "min–max" if max(n) < 5 else "95% CI"
    return f"mean over {'/'.join(map(str, n))} seed(s)" + (f", bars {kind}" if max(n) > 1 else "")


def plot_metric_vs_rank(rows: Sequence[Row], path: str, metric: str = "pearson") -> None:
    """Test ``metric`` against rank (log2 axis), one line per target set, baselines as bands."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, runs in _groups(rows).items():
        ax.errorbar([r.rank for r in runs], [r.test[metric].mean for r in runs],
                    yerr=_yerr([r.test[metric] for r in runs]), fmt="o-", capsize=3, label=label)
    _baseline_bands(ax, rows, metric)
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "LoRA rank r", f"test {metric}",
            f"MiniLM LoRA: test {metric} vs rank\n({_seeds_note(rows)})")


def plot_metric_vs_params(rows: Sequence[Row], path: str, metric: str = "pearson",
                          model: str = "MiniLM") -> None:
    """Test ``metric`` against trainable parameters (log axis), baselines as stars."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, runs in _groups(rows).items():
        ax.errorbar([r.trainable_params for r in runs], [r.test[metric].mean for r in runs],
                    yerr=_yerr([r.test[metric] for r in runs]), fmt="o-", capsize=3, label=label)
        for r in runs:
            ax.annotate(f"r{r.rank}", (r.trainable_params, r.test[metric].mean), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    for r in _baselines(rows):
        color, style = BASELINE_STYLE.get(r.method, ("tab:red", "-."))
        if r.trainable_params == 0:  # nothing trained (zero-shot): a line, not a point at 0
            ax.axhline(r.test[metric].mean, color=color, linestyle=style, label=_label(r))
            continue
        ax.errorbar([r.trainable_params], [r.test[metric].mean], yerr=_yerr([r.test[metric]]),
                    fmt="*", color=color, markersize=12, capsize=3, label=_label(r))
    ax.set_xscale("log")
    _finish(fig, ax, path, "trainable parameters", f"test {metric}",
            f"{model}: test {metric} vs trainable parameters\n({_seeds_note(rows)})")


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean_curve(records: list[dict]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    steps = [s for s, _ in records[0]["curve"]]
    curves = np.array([_smooth([v for _, v in r["curve"]]) for r in records])
    return steps, curves.mean(0), curves.min(0), curves.max(0)


def plot_training_curves(rows: Sequence[Row], records: Sequence[dict], path: str,
                         ylabel: str = "train MSE (standardized, smoothed)") -> None:
    """Training loss (moving average; mean over seeds, min–max shaded) of the picked runs: one
    panel per target set, baselines in each."""
    by_run = defaultdict(list)
    for r in records:
        by_run[r["run"]].append(r)
    groups = _groups(rows)
    panels = list(groups) or ["baselines"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False,
                             sharey=True)
    for ax, label in zip(axes[0], panels, strict=True):
        styled = [(r, None, "-", f"r={r.rank}") for r in groups.get(label, [])]
        styled += [(r, *BASELINE_STYLE.get(r.method, ("tab:red", "-.")), r.run)
                   for r in _baselines(rows)]
        for row, color, style, name in styled:
            steps, mean, lo, hi = _mean_curve(by_run[row.run])
            (line,) = ax.plot(steps, mean, color=color, linestyle=style,
                              label=f"{name} (lr {row.lr:g})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget_style(run: str) -> tuple[str | None, str]:
    return BASELINE_STYLE.get(run, (None, "-"))


def plot_metric_vs_budget(rows: dict[int, Sequence[Row]], path: str,
                          metric: str = "pearson") -> None:
    """Test ``metric`` against the step budget (log axis): one line per configuration, each
    budget at its own lr picked on validation, bars spanning the interval over seeds."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    runs = list(dict.fromkeys(r.run for rs in rows.values() for r in rs))
    for run in runs:
        points = [(s, r) for s, rs in rows.items() for r in rs if r.run == run]
        color, style = _budget_style(run)
        ax.errorbar([s for s, _ in points], [r.test[metric].mean for _, r in points],
                    yerr=_yerr([r.test[metric] for _, r in points]), fmt="o", linestyle=style,
                    color=color, capsize=3, label=run)
        for s, r in points:
            ax.annotate(f"{r.lr:g}", (s, r.test[metric].mean), fontsize=6, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xticks(list(rows), [str(s) for s in rows])
    ax.minorticks_off()
    flat = [r for rs in rows.values() for r in rs]
    _finish(fig, ax, path, "optimizer steps (batch 32; each budget its own schedule)",
            f"test {metric}", f"MiniLM: test {metric} vs training budget, lr picked on val per "
            f"budget (labels)\n({_seeds_note(flat)})")


def plot_val_curves(rows: dict[int, Sequence[Row]], records: Sequence[dict], path: str) -> None:
    """Validation Pearson along the longest budget's picked runs (mean over seeds, min–max
    shaded), and each shorter budget's end-of-run value (its own schedule) as a marker."""
    longest = max(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows[longest]:
        mine = [r for r in records if r["run"] == row.run and r.get("steps") == longest]
        curves = [[p for p in r["val_curve"] if len(p) > 2] for r in mine]
        if not mine or not all(curves) or len({len(c) for c in curves}) != 1:
            continue
        steps = [p[0] for p in curves[0]]
        values = np.array([[p[2] for p in c] for c in curves])
        color, style = _budget_style(row.run)
        (line,) = ax.plot(steps, values.mean(0), color=color, linestyle=style,
                          label=f"{row.run} ({longest} steps, lr {row.lr:g})")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.12)
        ends = [(s, r) for s, rs in rows.items() if s != longest for r in rs if r.run == row.run]
        ax.plot([s for s, _ in ends], [r.val["pearson"].mean for _, r in ends], "s",
                color=line.get_color(), markersize=5)
    _finish(fig, ax, path, "step", "validation pearson",
            f"validation Pearson along the {longest}-step runs (mean, min–max shaded)\n"
            "squares: each shorter budget's own runs at their end")


def plot_all(rows: Sequence[Row], records: Sequence[dict], out: str) -> list[str]:
    """Writes the three sweep plots into ``out`` and returns their paths.

    Args:
        rows: :func:`experiments.stats.aggregate`'s rows.
        records: the runs at each configuration's picked learning rate (every seed).
    """
    paths = [os.path.join(out, n) for n in
             ("metric_vs_rank.png", "metric_vs_params.png", "training_curves.png")]
    plot_metric_vs_rank(rows, paths[0])
    plot_metric_vs_params(rows, paths[1])
    plot_training_curves(rows, records, paths[2])
    return paths

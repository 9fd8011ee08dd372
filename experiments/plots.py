"""Plots of a sweep's results (matplotlib, written as PNG files)."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE_STYLE = {"head": ("tab:gray", ":"), "full": ("black", "--")}


def _lora_by_targets(records: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        if r["rank"] is not None:
            groups[f"{r['method']} {r['targets']}"].append(r)
    return {k: sorted(v, key=lambda r: r["rank"]) for k, v in groups.items()}


def _baselines(records: list[dict]) -> list[dict]:
    return [r for r in records if r["rank"] is None]


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_vs_rank(records: list[dict], path: str, metric: str = "pearson") -> None:
    """Test ``metric`` against rank (log2 axis), one line per target set, baselines dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, runs in _lora_by_targets(records).items():
        ax.plot([r["rank"] for r in runs], [r["test"][metric] for r in runs], "o-", label=label)
    for r in _baselines(records):
        color, style = BASELINE_STYLE.get(r["method"], ("tab:red", "-."))
        ax.axhline(r["test"][metric], color=color, linestyle=style, label=r["run"])
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "LoRA rank r", f"test {metric}", f"MiniLM LoRA: test {metric} vs rank")


def plot_metric_vs_params(records: list[dict], path: str, metric: str = "pearson") -> None:
    """Test ``metric`` against trainable parameters (log axis), baselines as stars."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, runs in _lora_by_targets(records).items():
        ax.plot([r["trainable_params"] for r in runs], [r["test"][metric] for r in runs], "o-",
                label=label)
        for r in runs:
            ax.annotate(f"r{r['rank']}", (r["trainable_params"], r["test"][metric]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    for r in _baselines(records):
        color, _ = BASELINE_STYLE.get(r["method"], ("tab:red", "-."))
        ax.plot([r["trainable_params"]], [r["test"][metric]], "*", color=color, markersize=12,
                label=r["run"])
    ax.set_xscale("log")
    _finish(fig, ax, path, "trainable parameters", f"test {metric}",
            f"MiniLM: test {metric} vs trainable parameters")


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(records: list[dict], path: str) -> None:
    """Training loss (moving average) per run: one panel per target set, baselines in each."""
    groups = _lora_by_targets(records)
    panels = list(groups) or ["baselines"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False,
                             sharey=True)
    for ax, label in zip(axes[0], panels, strict=True):
        for r in groups.get(label, []):
            steps = [s for s, _ in r["curve"]]
            ax.plot(steps, _smooth([v for _, v in r["curve"]]), label=f"r={r['rank']}")
        for r in _baselines(records):
            color, style = BASELINE_STYLE.get(r["method"], ("tab:red", "-."))
            ax.plot([s for s, _ in r["curve"]], _smooth([v for _, v in r["curve"]]),
                    color=color, linestyle=style, label=r["run"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("train MSE (standardized, smoothed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(records: list[dict], out: str) -> list[str]:
    """Writes the three sweep plots into ``out`` and returns their paths."""
    paths = [os.path.join(out, n) for n in
             ("metric_vs_rank.png", "metric_vs_params.png", "training_curves.png")]
    plot_metric_vs_rank(records, paths[0])
    plot_metric_vs_params(records, paths[1])
    plot_training_curves(records, paths[2])
    return paths

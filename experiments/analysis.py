"""What the adapters learned: the LoRA paper's section-7 analysis on a finished sweep.

``python -m experiments.analysis --out DIR`` reads the adapters that ``experiments.sweep`` saved
in ``DIR/adapters`` and writes, for two ranks of one target set (default r=8 vs r=64 on
``q,v``, as in the paper's figure 3), each at its learning rate picked on validation and paired
seed by seed (every seed both ranks finished):

- ``subspace_similarity.png``: φ(A_r1, A_r2, i, j) heatmaps per layer and module, the mean
  over seeds;
- ``delta_spectrum.png``: singular values of ΔW per layer (both ranks, first seed);
- ``analysis.json`` / ``analysis.md``: across seeds, per kernel, φ(1, r2) (the small adapter's
  top direction inside the large one's subspace), φ(r1, r2), ‖ΔW‖_F and the amplification
  factor, as mean [min, max] (or a 95% t-interval from 5 seeds); then per seed and kernel
  ‖ΔW‖_F, ‖UᵀWV‖_F for ΔW's top-r directions, the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F,
  and the same projection for W's own top-r directions and for random directions (the paper's
  table 7 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments import stats
from lorax import analysis


def _kernels(tree) -> dict[str, object]:
    import jax

    import lorax

    return {n.path: n for n in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(n)}


def _matrices(node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = np.asarray(node.w, np.float64)
    fan_in = int(np.prod(node.in_shape))
    return (w.reshape(fan_in, -1), np.asarray(node.a, np.float64).reshape(fan_in, node.rank),
            np.asarray(node.b, np.float64).reshape(node.rank, -1))


def analyze(small: dict, large: dict) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Table-7 rows for both runs and φ grids for each shared kernel path."""
    rows, grids = [], {}
    for path in sorted(small):
        for tag, node in (("small", small[path]), ("large", large[path])):
            w, a, b = _matrices(node)
            amp = analysis.amplification(w, a, b, node.scale)
            rows.append({
                "path": path, "run": tag, "rank": node.rank, **amp,
                "w_top_r_projection": analysis.top_projection_norm(w, node.rank),
                "random_projection": analysis.random_projection_norm(w, node.rank, seed=0),
                "spectrum": analysis.delta_spectrum(a, b, node.scale).tolist(),
            })
        grids[path] = analysis.subspace_similarity(_matrices(small[path])[1],
                                                   _matrices(large[path])[1])
    return rows, grids


def _plot(rows: list[dict], grids: dict[str, np.ndarray], out: str, ranks) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = sorted(grids)
    cols = min(len(paths), 6)
    nrows = (len(paths) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols + 1, 2.3 * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(paths):]:
        ax.axis("off")
    for ax, path in zip(axes.flat, paths, strict=False):
        image = ax.imshow(grids[path], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          origin="lower", extent=(0.5, grids[path].shape[1] + 0.5, 0.5,
                                                  grids[path].shape[0] + 0.5))
        ax.set_title(path.replace("bert/encoder/", "").replace("/kernel", ""), fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(f"j (r={ranks[1]})", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"i (r={ranks[0]})", fontsize=7)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="φ(i, j)")
    heat = os.path.join(out, "subspace_similarity.png")
    fig.savefig(heat, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, tag in zip(axes, ("small", "large"), strict=True):
        for row in (r for r in rows if r["run"] == tag):
            ax.semilogy(range(1, len(row["spectrum"]) + 1), row["spectrum"], ".-", lw=0.8,
                        label=row["path"].replace("bert/encoder/", "").replace("/kernel", ""))
        ax.set_title(f"singular values of ΔW (r={ranks[0 if tag == 'small' else 1]})")
        ax.set_xlabel("index")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=5, ncol=2)
    spectrum = os.path.join(out, "delta_spectrum.png")
    fig.tight_layout()
    fig.savefig(spectrum, dpi=110)
    plt.close(fig)
    return [heat, spectrum]


def _table(rows: list[dict]) -> str:
    lines = ["| seed | kernel | rank | ‖ΔW‖_F | ‖UᵀWV‖_F (ΔW dirs) | amplification "
             "| ‖UᵀWV‖_F (W top-r) | ‖UᵀWV‖_F (random) | ‖W‖_F |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['path']} | {r['rank']} | {r['delta_norm']:.4f} | "
            f"{r['projected_w_norm']:.4f} "
            f"| {r['amplification']:.2f} | {r['w_top_r_projection']:.3f} | "
            f"{r['random_projection']:.3f} | {r['w_norm']:.2f} |"
        )
    return "\n".join(lines)


def summarize(per_seed: list[tuple[list[dict], dict[str, np.ndarray]]], ranks) -> list[dict]:
    """Per kernel, across seeds: φ(1, r2), φ(r1, r2), ‖ΔW‖_F and amplification of both runs."""
    out = []
    for path in sorted(per_seed[0][1]):
        grids = [grids[path] for _, grids in per_seed]
        rows = [r for seed_rows, _ in per_seed for r in seed_rows if r["path"] == path]
        summary = {"path": path,
                   "phi_top": stats.interval([g[0, -1] for g in grids]),
                   "phi_all": stats.interval([g[ranks[0] - 1, ranks[1] - 1] for g in grids])}
        for tag in ("small", "large"):
            mine = [r for r in rows if r["run"] == tag]
            summary[f"delta_norm_{tag}"] = stats.interval([r["delta_norm"] for r in mine])
            summary[f"amplification_{tag}"] = stats.interval([r["amplification"] for r in mine])
        out.append(summary)
    return out


def _summary_table(summary: list[dict], ranks) -> str:
    r1, r2 = ranks
    lines = [f"| kernel | φ(1, {r2}) | φ({r1}, {r2}) | ‖ΔW‖_F r={r1} | ‖ΔW‖_F r={r2} | "
             f"amplification r={r1} | amplification r={r2} |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [s[k] for k in ("phi_top", "phi_all", "delta_norm_small", "delta_norm_large",
                                "amplification_small", "amplification_large")]
        name = s["path"].replace("bert/encoder/", "").replace("/kernel", "")
        lines.append(f"| {name} | " + " | ".join(f"{c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}]"
                                                  for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep", help="the sweep's output directory")
    parser.add_argument("--ranks", type=int, nargs=2, default=(8, 64), metavar=("R1", "R2"))
    parser.add_argument("--targets", default="q,v", help="target set of both runs")
    args = parser.parse_args(argv)
    if args.ranks[0] == args.ranks[1]:  # the same run twice: every row would repeat
        parser.error(f"expected two different ranks to compare, got --ranks {args.ranks[0]} "
                     f"{args.ranks[1]}")
    from experiments import sweep

    try:
        chosen = [dict(sweep.chosen_runs(args.out, "lora", r, args.targets)) for r in args.ranks]
        seeds = sorted(set(chosen[0]) & set(chosen[1]))
        if not seeds:
            raise sweep.UsageError(f"no seed finished for both ranks {args.ranks} in {args.out}")
        per_seed = []
        for seed in seeds:
            small, large = (sweep.load_run(args.out, "lora", r, args.targets, seed, c[seed])
                            for r, c in zip(args.ranks, chosen, strict=True))
            per_seed.append(analyze(_kernels(small), _kernels(large)))
    except sweep.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mean_grids = {k: np.mean([g[k] for _, g in per_seed], axis=0) for k in per_seed[0][1]}
    figures = _plot(per_seed[0][0], mean_grids, args.out, args.ranks)
    summary = summarize(per_seed, args.ranks)
    rows = [{"seed": seed, **row} for seed, (rows, _) in zip(seeds, per_seed, strict=True)
            for row in rows]
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump({"ranks": list(args.ranks), "targets": args.targets, "seeds": seeds,
                   "lrs": [[c[s] for s in seeds] for c in chosen], "kernels": rows,
                   "summary": [{k: (v._asdict() if isinstance(v, stats.Interval) else v)
                                for k, v in s.items()} for s in summary],
                   "subspace_similarity": {k: v.tolist() for k, v in mean_grids.items()},
                   "subspace_similarity_per_seed": [{k: v.tolist() for k, v in g.items()}
                                                    for _, g in per_seed]}, f)
    lrs = ", ".join(f"r={r}: lr {chosen[i][seeds[0]]:g}" for i, r in enumerate(args.ranks))
    text = (f"Across seeds {seeds} ({lrs}; picked on validation): mean [interval]\n\n"
            f"{_summary_table(summary, args.ranks)}\n\nPer seed:\n\n{_table(rows)}\n")
    with open(os.path.join(args.out, "analysis.md"), "w") as f:
        f.write(text)
    print(text)
    print("wrote " + ", ".join(figures), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

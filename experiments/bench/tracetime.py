"""Trace and compile time of the LoRA step against the full fine-tuning step.

:func:`lorax.lora` traces the model once with each kernel shown as its frozen ``w``, then
re-evaluates that jaxpr with the adapters, so a LoRA step costs more Python work to trace than
the full step. :func:`trace_times` measures ``jax.jit(step).trace(*abstract args)`` of both steps
of the benchmark GPT (:mod:`experiments.bench.steps`), interleaved (L F L F ...) with
``jax.clear_caches()`` before each trace, so every repetition is a first trace. Tracing is
single-threaded Python, so the clock is the tracing thread's CPU time (``time.thread_time``):
on a shared machine it leaves out the time spent waiting for a core. Trace time depends on the
number of equations (layers), not on widths: the sweep uses narrow models of
:data:`TRACE_DEPTHS` unrolled layers. :func:`step_times` with ``compile=True`` also lowers and
compiles each step (wall seconds): the time a user waits before the first step runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax

import lorax
from experiments import gpt
from experiments.bench.cost import abstract
from experiments.bench.steps import make_steps
from experiments.bench.workloads import Workload, gpt_workload

TRACE_DEPTHS = (24, 48)
"""Layer counts of the trace-time sweep (:func:`trace_sweep`)."""

COMPILE_REPS = 2
"""Interleaved compile-time repetitions per step in the benchmark (one with ``--quick``)."""

TRACE_RANK = 8
"""LoRA rank of the traced steps (trace time does not depend on it)."""


def narrow_gpt(n_layers: int) -> gpt.GPTConfig:
    """A narrow GPT of ``n_layers`` blocks: as many equations per layer as the benchmark's.

    Example:
        >>> narrow_gpt(3).n_layers, narrow_gpt(3).d_model
        (3, 32)
    """
    return gpt.GPTConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, d_ff=64,
                         max_len=16)


def trace_times(config: gpt.GPTConfig, reps: int = 5, rank: int = TRACE_RANK
                ) -> dict[str, list[float]]:
    """CPU seconds to trace the LoRA and the full step of a GPT, ``reps`` interleaved times each.

    Both steps are traced on abstract arguments (``jax.ShapeDtypeStruct`` params, optimizer
    state and batch); caches are cleared before each trace.

    Args:
        config: The GPT's shapes.
        reps: Repetitions of each trace.
        rank: The LoRA rank.

    Returns:
        ``{"lora": [seconds, ...], "full": [seconds, ...]}``, ``reps`` each.

    Example:
        >>> times = trace_times(narrow_gpt(1), reps=1)
        >>> times["lora"][0] > 0 and times["full"][0] > 0
        True
    """
    workload = gpt_workload(config, batch_size=1, abstract_params=True)
    return step_times(workload, reps, rank, compile=False)


def step_times(workload: Workload, reps: int, rank: int = TRACE_RANK, compile: bool = False
               ) -> dict[str, list[float]]:
    """Seconds to trace (``compile=False``: the tracing thread's CPU time) or to trace, lower
    and compile (``compile=True``: wall time, XLA compiles on its own threads) the LoRA and the
    full step of ``workload``, ``reps`` interleaved times each, caches cleared before each."""
    steps = make_steps(workload)
    params, batch = abstract(workload.params), abstract(workload.batch)
    trainable, frozen = lorax.split(lorax.wrap(params, rank, **workload.wrap_kwargs))
    args = {
        "lora": (steps.lora, (trainable, frozen, jax.eval_shape(steps.tx_lora.init, trainable),
                              batch)),
        "full": (steps.full, (params, jax.eval_shape(steps.tx_full.init, params), batch)),
    }
    clock = time.perf_counter if compile else time.thread_time
    times: dict[str, list[float]] = {name: [] for name in args}
    for _ in range(reps):
        for name, (fn, fn_args) in args.items():
            jax.clear_caches()
            start = clock()
            traced = jax.jit(fn).trace(*fn_args)
            if compile:
                traced.lower().compile()
            times[name].append(clock() - start)
    return times


def ratio_summary(times: dict[str, list[float]], what: str) -> dict[str, float]:
    """The per-repetition LoRA/full ratio of ``times`` (median, min, max) and the median
    seconds of each, keyed ``lora_over_full_{what}``, ``..._min``, ``..._max``,
    ``{what}_s_lora`` and ``{what}_s_full``.

    Example:
        >>> out = ratio_summary({"lora": [1.0, 3.0], "full": [2.0, 2.0]}, "trace")
        >>> out["lora_over_full_trace"], out["lora_over_full_trace_max"], out["trace_s_full"]
        (1.0, 1.5, 2.0)
    """
    ratios = [a / b for a, b in zip(times["lora"], times["full"], strict=True)]
    return {
        f"lora_over_full_{what}": statistics.median(ratios),
        f"lora_over_full_{what}_min": min(ratios),
        f"lora_over_full_{what}_max": max(ratios),
        f"{what}_s_lora": statistics.median(times["lora"]),
        f"{what}_s_full": statistics.median(times["full"]),
    }


def trace_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """:func:`ratio_summary` of trace times (:func:`trace_times`)."""
    return ratio_summary(times, "trace")


def compile_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """:func:`ratio_summary` of compile times (:func:`step_times` with ``compile=True``)."""
    return ratio_summary(times, "compile")


def trace_sweep(depths: Sequence[int] = TRACE_DEPTHS, reps: int = 5) -> list[dict[str, Any]]:
    """:func:`trace_summary` of narrow GPTs (:func:`narrow_gpt`) of each depth in ``depths``.

    Returns:
        One JSON-ready row per depth: ``n_layers``, ``reps`` and the summary.
    """
    return [{"n_layers": n, "reps": reps, **trace_summary(trace_times(narrow_gpt(n), reps))}
            for n in depths]


def trace_report(config: gpt.GPTConfig, reps: int, depths: Sequence[int] = ()
                 ) -> dict[str, Any]:
    """The benchmark's ``trace`` entry: the GPT of ``config`` and a sweep over ``depths``.

    Returns:
        ``{"n_layers", "reps", <trace_summary>, "sweep": trace_sweep(depths, reps)}``.
    """
    return {"n_layers": config.n_layers, "reps": reps,
            **trace_summary(trace_times(config, reps)), "sweep": trace_sweep(depths, reps)}

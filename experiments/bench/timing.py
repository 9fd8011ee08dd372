"""Wall time of the LoRA, full and frozen steps, interleaved in one process.

The steps run round-robin (L F Z L F Z ..., ``block_until_ready``) after warm-up, and the
LoRA/full ratio is summarized per round (median, min, max): absolute milliseconds are context
only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import lorax
from experiments.bench.handwritten import init_factors
from experiments.bench.steps import Steps
from experiments.bench.workloads import Workload


def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree`` in new buffers (so one of the two may be donated)."""
    return jax.tree.map(jnp.copy, tree)


def interleaved_wall(
    runners: dict[str, Callable[[], Any]], steps: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Times the runners round-robin (A B C A B C ...) and returns seconds per step of each.

    Each runner performs one step and returns its outputs; the timer stops after
    ``jax.block_until_ready`` on them. ``warmup`` rounds run first and are not recorded.

    Example:
        >>> times = interleaved_wall({"a": lambda: jnp.ones(2), "b": lambda: jnp.zeros(2)}, 3, 1)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def wall_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Per-round ratios of LoRA to every other step (median, min, max) and median milliseconds.

    Example:
        >>> out = wall_summary({"lora": [1.0, 2.0], "full": [2.0, 2.0], "frozen": [1.0, 1.0]})
        >>> out["lora_over_full_wall"], out["lora_over_full_wall_min"], out["ms_full"]
        (0.75, 0.5, 2000.0)
        >>> out["lora_over_frozen_wall_max"]
        2.0
    """
    summary: dict[str, float] = {}
    for other in times:
        summary[f"ms_{other}"] = 1e3 * statistics.median(times[other])
        if other == "lora":
            continue
        ratios = [a / b for a, b in zip(times["lora"], times[other], strict=True)]
        summary[f"lora_over_{other}_wall"] = statistics.median(ratios)
        summary[f"lora_over_{other}_wall_min"] = min(ratios)
        summary[f"lora_over_{other}_wall_max"] = max(ratios)
    summary["wall_steps"] = len(times["lora"])
    return summary


def time_steps(
    workload: Workload, steps: Steps, lp: Any, compiled: dict[str, Any], rounds: int, warmup: int
) -> dict[str, float]:
    """Runs the compiled LoRA, full, frozen (and hand-written LoRA, where compiled) steps
    interleaved; see :func:`wall_summary`.

    Args:
        workload: The model.
        steps: Its step functions (for the optimizers' ``init``).
        lp: The concrete wrapped params (not modified: the donated halves are copies).
        compiled: Executables ``"lora"``, ``"full"`` and ``"frozen"`` (see
            :func:`~experiments.bench.cost.base_costs`, :func:`~experiments.bench.cost.rank_costs`).
        rounds: Timed rounds.
        warmup: Untimed rounds first.
    """
    batch = workload.batch
    trainable, frozen = lorax.split(lp)
    trainable = copy_tree(trainable)  # donated below
    full_params = copy_tree(workload.params)
    state = {
        "lora": (trainable, steps.tx_lora.init(trainable)),
        "full": (full_params, steps.tx_full.init(full_params)),
    }

    def run_lora() -> Any:
        t, o = state["lora"]
        t, o, loss = compiled["lora"](t, frozen, o, batch)
        state["lora"] = (t, o)
        return t, o, loss

    def run_full() -> Any:
        p, o, loss = compiled["full"](*state["full"], batch)
        state["full"] = (p, o)
        return p, o, loss

    def run_frozen() -> Any:
        return compiled["frozen"](workload.params, batch)

    runners = {"lora": run_lora, "full": run_full, "frozen": run_frozen}
    if "handwritten" in compiled:
        rank = next(n for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n)).rank
        factors = init_factors(workload.params, rank)
        state["handwritten"] = (factors, steps.tx_full.init(factors))

        def run_handwritten() -> Any:
            f, o = state["handwritten"]
            f, o, loss = compiled["handwritten"](f, workload.params, o, batch)
            state["handwritten"] = (f, o)
            return f, o, loss

        runners["handwritten"] = run_handwritten
    return wall_summary(interleaved_wall(runners, rounds, warmup))

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
    """Per-round LoRA/full and LoRA/frozen ratios (median, min, max) and median milliseconds.

    Example:
        >>> out = wall_summary({"lora": [1.0, 2.0], "full": [2.0, 2.0], "frozen": [1.0, 1.0]})
        >>> out["lora_over_full_wall"], out["lora_over_full_wall_min"], out["ms_full"]
        (0.75, 0.5, 2000.0)
    """
    over_full = [a / b for a, b in zip(times["lora"], times["full"], strict=True)]
    over_frozen = [a / b for a, b in zip(times["lora"], times["frozen"], strict=True)]
    return {
        "lora_over_full_wall": statistics.median(over_full),
        "lora_over_full_wall_min": min(over_full),
        "lora_over_full_wall_max": max(over_full),
        "lora_over_frozen_wall": statistics.median(over_frozen),
        "ms_lora": 1e3 * statistics.median(times["lora"]),
        "ms_full": 1e3 * statistics.median(times["full"]),
        "ms_frozen": 1e3 * statistics.median(times["frozen"]),
        "wall_steps": len(over_full),
    }


def time_steps(
    workload: Workload, steps: Steps, lp: Any, compiled: dict[str, Any], rounds: int, warmup: int
) -> dict[str, float]:
    """Runs the compiled LoRA, full and frozen steps interleaved; see :func:`wall_summary`.

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
    return wall_summary(interleaved_wall(runners, rounds, warmup))

"""Rank scaling: LoRA-step FLOPs at r = 1, 2, 4, ... against the frozen floor and full step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

import lorax
from experiments.bench.cost import abstract, lora_cost
from experiments.bench.steps import make_steps
from experiments.bench.workloads import Workload

RANK_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Ranks of the rank-scaling sweep (capped at the model's largest valid rank)."""

QUICK_SWEEP = (1, 8, 64)
"""Ranks of the sweep with ``--quick``."""


def max_rank(params: Any, **wrap_kwargs: Any) -> int:
    """The largest rank every adapted kernel accepts: the least ``min(fan_in, fan_out)``.

    Args:
        params: A parameter tree (concrete or abstract).
        **wrap_kwargs: Keyword arguments of :func:`lorax.wrap` (``targets``, ``train``...).

    Example:
        >>> import jax.numpy as jnp
        >>> max_rank({"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((4, 32))}})
        4
    """
    lp = lorax.wrap(abstract(params), 1, **wrap_kwargs)
    kernels = [n for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    return min(min(math.prod(n.in_shape), math.prod(n.out_shape)) for n in kernels)


def rank_sweep(
    workload: Workload,
    ranks: Sequence[int],
    frozen_flops: float,
    full_flops: float,
    known: dict[int, float] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """LoRA-step FLOPs at each rank, against the frozen floor and the full step.

    Args:
        workload: The model.
        ranks: The ranks (each at most :func:`max_rank`).
        frozen_flops: FLOPs of the frozen forward + input-gradient step.
        full_flops: FLOPs of the full fine-tuning step.
        known: ``{rank: LoRA-step FLOPs}`` already measured (not compiled again).
        progress: Called with a label before each compile.

    Returns:
        One dict per rank: ``model``, ``rank``, ``trainable_params``, ``flops_lora``,
        ``lora_over_frozen_flops``, ``lora_over_full_flops``.
    """
    steps = make_steps(workload)
    known = dict(known or {})
    rows = []
    for rank in ranks:
        if rank not in known:
            progress(f"{workload.name} sweep r={rank}")
            known[rank] = lora_cost(workload, steps, rank, fast=True)[1].flops
        lp = lorax.wrap(abstract(workload.params), rank, **workload.wrap_kwargs)
        rows.append({
            "model": workload.name,
            "rank": rank,
            "trainable_params": lorax.summary(lp).trainable,
            "flops_lora": known[rank],
            "lora_over_frozen_flops": known[rank] / frozen_flops,
            "lora_over_full_flops": known[rank] / full_flops,
        })
    return rows

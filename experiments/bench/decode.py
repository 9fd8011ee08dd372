"""Greedy decode throughput of the Llama (``smollm2``): base params, a merged adapter, and the
unmerged factorized adapter, interleaved in one process.

:func:`measure_decode` runs :func:`experiments.llama.generate` (one prefill of a left-padded
prompt batch, then a ``lax.scan`` of one-token steps with the KV cache) through
``jax.jit(lorax.lora(decode))`` with the parameter tree as an argument, as the E2E experiment
does, for three trees:

* ``base``: the plain params;
* ``merged``: :func:`lorax.merge` of the adapter (identical shapes, hence the same executable);
* ``unmerged``: the factorized adapter itself (every projection at ``rank``, with random
  nonzero ``b`` so that the low-rank term is real work and changes the output).

After warm-up the three run round-robin (B M U B M U ..., ``block_until_ready``); the report
gives median tokens/s (generated tokens over the whole call, prefill included) and the median,
min and max of the per-round ratios ``unmerged/merged`` and ``merged/base``. Alongside, XLA's
cost analysis of one single-token decode step of each tree (``Llama(config, unroll=True)``,
straight-line layers, cache donated as in the scan) gives deterministic bytes and FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lorax
from experiments import llama
from experiments.bench.cost import abstract, compile_step
from experiments.bench.timing import interleaved_wall

DECODE_BATCHES = (8, 64)
"""Rows per decode batch (the E2E experiment generates 64 at a time)."""

PROMPT_LEN = 48
"""Prompt width: every row is left-padded to it."""

NEW_TOKENS = 32
"""Tokens generated per row."""

DECODE_RANK = 8
"""Rank of the adapter (every projection, lorax's default targets)."""

QUICK = {"batches": (2, 4), "prompt_len": 16, "new_tokens": 8}
"""The shapes of ``--quick`` (on the tiny Llama)."""

TREES = ("base", "merged", "unmerged")


def random_adapter(params: Any, rank: int = DECODE_RANK, seed: int = 0,
                   b_std: float = 0.01) -> Any:
    """``lorax.wrap(params, rank)`` with every ``b`` drawn from ``N(0, b_std²)`` (not zero)."""
    lp = lorax.wrap(params, rank)
    leaves, treedef = jax.tree.flatten(lp, is_leaf=lorax.is_lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [dataclasses.replace(n, b=(b_std * jax.random.normal(k, n.b.shape)).astype(n.b.dtype))
              if lorax.is_lora(n) else n for n, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def prompts(config: llama.LlamaConfig, rows: int, width: int, seed: int = 0):
    """``(ids, valid)``: ``rows`` random prompts of ``width // 2`` to ``width`` tokens,
    left-padded with 0 to ``width`` (``valid`` is False on the padding)."""
    id_key, len_key = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(id_key, (rows, width), 0, config.vocab_size, jnp.int32)
    lengths = jax.random.randint(len_key, (rows, 1), width // 2, width + 1)
    valid = jnp.arange(width)[None, :] >= width - lengths
    return jnp.where(valid, ids, 0), valid


def decoder(config: llama.LlamaConfig, new_tokens: int, unroll: int | bool = 1):
    """``jax.jit(lorax.lora(decode))``: ``(tree, ids, valid) -> (rows, new_tokens)`` greedy ids
    (no end-of-sequence token, so every row generates ``new_tokens``)."""
    model = llama.Llama(config, unroll=unroll)

    def decode(tree: Any, ids: jax.Array, valid: jax.Array) -> jax.Array:
        def apply(*args: Any, **kwargs: Any):
            return model.apply({"params": tree}, *args, **kwargs)

        return llama.generate(apply, config, ids, valid, new_tokens, eos_id=-1, pad_id=0)

    return jax.jit(lorax.lora(decode))


def step_cost(config: llama.LlamaConfig, tree: Any, rows: int, slots: int):
    """XLA's :class:`~experiments.bench.cost.Cost` of one single-token decode step of ``tree``
    (abstract) on ``rows`` rows with a cache of ``slots`` positions (donated)."""
    model = llama.Llama(config, unroll=True)

    def step(tree: Any, token: jax.Array, positions: jax.Array, cache: Any, index: jax.Array):
        return model.apply({"params": tree}, token, positions=positions, cache=cache,
                           index=index)

    token = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
    cache = abstract(jax.eval_shape(lambda: llama.init_cache(config, rows, slots)))
    index = jax.ShapeDtypeStruct((), jnp.int32)
    return compile_step(lorax.lora(step), abstract(tree), token, token, cache, index,
                        donate_argnums=(3,), fast=True)[1]


def decode_costs(params: Any, config: llama.LlamaConfig, rows: int, slots: int,
                 rank: int = DECODE_RANK) -> dict[str, float]:
    """``step_bytes_*`` and ``step_flops_*`` of base, merged and unmerged trees (see
    :func:`step_cost`; ``params`` may be abstract), and the unmerged/merged ratios."""
    lp = lorax.wrap(abstract(params), rank)
    trees = {"base": params, "merged": jax.eval_shape(lorax.merge, lp), "unmerged": lp}
    out: dict[str, float] = {}
    for name, tree in trees.items():
        cost = step_cost(config, tree, rows, slots)
        out[f"step_bytes_{name}"] = cost.bytes_accessed
        out[f"step_flops_{name}"] = cost.flops
    for what in ("bytes", "flops"):
        out[f"unmerged_over_merged_step_{what}"] = (out[f"step_{what}_unmerged"]
                                                    / out[f"step_{what}_merged"])
    return out


def _spread(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    key = f"{a}_over_{b}_wall"
    return {key: statistics.median(ratios), f"{key}_min": min(ratios),
            f"{key}_max": max(ratios)}


def measure_decode(
    params: Any,
    config: llama.LlamaConfig,
    batches: Sequence[int] = DECODE_BATCHES,
    prompt_len: int = PROMPT_LEN,
    new_tokens: int = NEW_TOKENS,
    rank: int = DECODE_RANK,
    rounds: int = 5,
    warmup: int = 2,
    model: str = "smollm2",
) -> list[dict[str, Any]]:
    """Decode tokens/s of base, merged and unmerged trees, and their decode-step costs.

    ``max(warmup, 2)`` untimed rounds, the first of which compiles, precede ``rounds`` timed
    ones, per batch size.

    Returns:
        One JSON-ready row per batch size: ``tokens_per_s_{base,merged,unmerged}``,
        ``ms_*``, ``unmerged_over_merged_wall`` and ``merged_over_base_wall`` (median of the
        per-round ratios, with ``_min``/``_max``), ``step_bytes_*``/``step_flops_*`` (one
        decode step, XLA cost analysis), ``unmerged_over_merged_step_bytes`` and
        ``tokens_match`` (the fraction of generated ids on which unmerged and merged agree).
    """
    lp = random_adapter(params, rank)
    trees = {"base": params, "merged": jax.jit(lorax.merge)(lp), "unmerged": lp}
    decode = decoder(config, new_tokens)
    rows = []
    for n in batches:
        ids, valid = prompts(config, n, prompt_len)
        runners = {name: functools.partial(decode, tree, ids, valid)
                   for name, tree in trees.items()}
        outputs = {name: run() for name, run in runners.items()}  # compiles: warm-up round 1
        times = interleaved_wall(runners, rounds, max(warmup - 1, 1))
        row: dict[str, Any] = {"model": model, "rows": n, "prompt": prompt_len,
                               "new_tokens": new_tokens, "rank": rank, "rounds": rounds,
                               "tokens_match": float(jnp.mean(outputs["unmerged"]
                                                              == outputs["merged"]))}
        for name in TREES:
            seconds = statistics.median(times[name])
            row[f"ms_{name}"] = 1e3 * seconds
            row[f"tokens_per_s_{name}"] = n * new_tokens / seconds
        row.update(_spread(times, "unmerged", "merged"))
        row.update(_spread(times, "merged", "base"))
        row.update(decode_costs(params, config, n, prompt_len + new_tokens, rank))
        rows.append(row)
    return rows

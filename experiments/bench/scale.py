"""Scale planning: LoRA sizes of Llama-2-shaped bf16 trees, without allocating them.

:func:`plan_scale` wraps an abstract (``jax.ShapeDtypeStruct``) Llama-2-7B- or 70B-shaped tree
(:func:`llama_shapes`) and initialises the optimizer on its trainable half, abstractly: trainable
parameters, adapter and Adam-state bytes, and the wall time of the planning itself.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorax
from experiments.bench.footprint import optstate_bytes, tree_bytes
from experiments.bench.steps import LEARNING_RATE

SCALE_RANK = 8
"""Rank of the scale-planning runs."""

LLAMA_SHAPES = {
    "llama2-7b": {"n_layers": 32, "d": 4096, "ffn": 11008, "kv": 4096, "vocab": 32000},
    "llama2-70b": {"n_layers": 80, "d": 8192, "ffn": 28672, "kv": 1024, "vocab": 32000},
}
"""Llama-2 shapes (``kv``: width of the k/v projections; 70B uses grouped-query attention)."""

TARGET_SETS = {
    "qkvo": r"/(q|k|v|o)_proj/kernel$",
    "all-linear": r"_proj/kernel$",
}
"""Scale-planning targets: attention only, and every linear layer but ``lm_head`` (PEFT's
``all-linear``)."""


def llama_shapes(
    n_layers: int, d: int, ffn: int, kv: int, vocab: int, dtype: Any = jnp.bfloat16
) -> dict[str, Any]:
    """An abstract Llama-shaped Linen parameter tree of ``jax.ShapeDtypeStruct`` leaves.

    Example:
        >>> tree = llama_shapes(n_layers=2, d=8, ffn=16, kv=4, vocab=10)
        >>> tree["layers_1"]["self_attn"]["k_proj"]["kernel"].shape
        (8, 4)
        >>> tree_bytes(tree) // 2  # bf16: 2 layers * 592 + embed 80 + lm_head 80 + norm 8
        1352
    """
    def leaf(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    def layer() -> dict[str, Any]:
        return {
            "input_layernorm": {"scale": leaf(d)},
            "self_attn": {
                "q_proj": {"kernel": leaf(d, d)},
                "k_proj": {"kernel": leaf(d, kv)},
                "v_proj": {"kernel": leaf(d, kv)},
                "o_proj": {"kernel": leaf(d, d)},
            },
            "post_attention_layernorm": {"scale": leaf(d)},
            "mlp": {
                "gate_proj": {"kernel": leaf(d, ffn)},
                "up_proj": {"kernel": leaf(d, ffn)},
                "down_proj": {"kernel": leaf(ffn, d)},
            },
        }

    tree: dict[str, Any] = {"embed_tokens": {"embedding": leaf(vocab, d)}}
    tree.update({f"layers_{i}": layer() for i in range(n_layers)})
    tree["norm"] = {"scale": leaf(d)}
    tree["lm_head"] = {"kernel": leaf(d, vocab)}
    return tree


def plan_scale(name: str, targets: str, rank: int = SCALE_RANK) -> dict[str, Any]:
    """Abstract wrap + Adam init of a Llama-shaped tree: sizes and the wall time of planning.

    Two ways, both timed: ``jax.eval_shape`` of ``lorax.wrap`` followed by
    ``lorax.optimizer(optax.adam).init`` (everything traced, factor initialisers included), and
    ``lorax.wrap`` applied to the ``jax.ShapeDtypeStruct`` tree directly (it returns abstract
    factors without tracing initialisers) followed by ``jax.eval_shape`` of ``init``. Neither
    may allocate device memory: the live-array count is recorded before and after.

    Args:
        name: A key of :data:`LLAMA_SHAPES`.
        targets: A key of :data:`TARGET_SETS`.
        rank: The LoRA rank.

    Returns:
        A JSON-ready dict of parameter counts, bytes and timings (``eval_shape_s``,
        ``direct_s``).
    """
    tree = llama_shapes(**LLAMA_SHAPES[name])
    tx = lorax.optimizer(optax.adam(LEARNING_RATE))

    def plan(params: Any) -> tuple[Any, Any]:
        lp = lorax.wrap(params, rank, targets=TARGET_SETS[targets])
        return lp, tx.init(lorax.split(lp)[0])

    live_before = len(jax.live_arrays())
    start = time.perf_counter()
    lp, opt_state = jax.eval_shape(plan, tree)
    eval_shape_s = time.perf_counter() - start
    start = time.perf_counter()
    direct = lorax.wrap(tree, rank, targets=TARGET_SETS[targets])
    direct_state = jax.eval_shape(tx.init, lorax.split(direct)[0])
    direct_s = time.perf_counter() - start
    live_after = len(jax.live_arrays())
    if jax.tree.structure((lp, opt_state)) != jax.tree.structure((direct, direct_state)):
        raise AssertionError("abstract wrap and eval_shape(wrap) disagree in structure")
    summary = lorax.summary(lp)
    return {
        "model": name,
        "targets": targets,
        "rank": rank,
        "dtype": "bfloat16",
        "total_params": summary.total,
        "trainable_params": summary.trainable,
        "trainable_fraction": summary.trainable / summary.total,
        "adapted_kernels": len(summary.adapted),
        "base_bytes": summary.frozen_bytes,
        "adapter_bytes": summary.trainable_bytes,
        "optstate_bytes_lora": tree_bytes(opt_state),
        "optstate_bytes_full": optstate_bytes(optax.adam(LEARNING_RATE), tree),
        "eval_shape_s": eval_shape_s,
        "direct_s": direct_s,
        "live_arrays_delta": live_after - live_before,
    }

"""The benchmark GPT's LoRA step written by hand in plain JAX: the bar lorax is measured against.

:func:`handwritten_loss` is :class:`experiments.gpt.GPT` (decode half: blocks, final LayerNorm,
head) re-implemented with ``jnp`` over the plain parameter tree, every kernel used as a user
would write LoRA without a library: ``x·stop_gradient(W) + s·(x·A)·B`` with ``jnp.einsum`` on
the model's own activation shapes. :func:`handwritten_step` differentiates it with respect to the
factors only and applies Adam, like the LoRA step of :mod:`experiments.bench.steps`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments import gpt

LN_EPSILON = 1e-6
"""Flax ``nn.LayerNorm``'s default epsilon."""


def init_factors(params: Any, rank: int, key: jax.Array | None = None) -> Any:
    """``{path: (a, b)}`` for every ``kernel`` of ``params``: ``a`` Gaussian, ``b`` zero.

    ``a`` is ``(*in, r)`` and ``b`` is ``(r, *out)`` with the GPT's layouts: q/k/v kernels
    ``(d, heads, head_dim)`` have one input axis, the attention output ``(heads, head_dim, d)``
    two, Dense kernels one.
    """
    key = jax.random.key(0) if key is None else key
    factors = {}
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, w in flat.items():
        if not path.endswith("kernel"):
            continue
        n_in = 2 if path.endswith("attn/out/kernel") else 1
        key, sub = jax.random.split(key)
        a = jax.random.normal(sub, (*w.shape[:n_in], rank), w.dtype) / math.sqrt(
            math.prod(w.shape[:n_in]))
        factors[path] = (a, jnp.zeros((rank, *w.shape[n_in:]), w.dtype))
    return factors


def _layer_norm(p: Any, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPSILON) * p["scale"] + p["bias"]


def handwritten_loss(factors: Any, params: Any, batch: tuple[jax.Array, jax.Array],
                     config: gpt.GPTConfig, alpha: float) -> jax.Array:
    """The GPT's next-token loss on ``batch = (tokens, labels)``, LoRA written out by hand
    with scale ``alpha / r`` (the embeddings frozen, as in the benchmark's LoRA step)."""
    scale = alpha / next(iter(factors.values()))[0].shape[-1]

    def lora(path: str, x: jax.Array, spec: str, low_in: str, low_out: str) -> jax.Array:
        w = jax.lax.stop_gradient(_get(params, path))
        a, b = factors[path]
        frozen = jnp.einsum(spec, x, w)
        return frozen + scale * jnp.einsum(low_out, jnp.einsum(low_in, x, a), b)

    tokens, labels = batch
    seq_len = tokens.shape[-1]
    h = params["tok_embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][:seq_len]
    h = jax.lax.stop_gradient(h)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))
    x = h
    for i in range(config.n_layers):
        blk = f"blocks_{i}"
        y = _layer_norm(_get(params, f"{blk}/ln_attn"), x)
        qkv = []
        for name in ("query", "key", "value"):
            path = f"{blk}/attn/{name}/kernel"
            qkv.append(lora(path, y, "btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk")
                       + _get(params, f"{blk}/attn/{name}/bias"))
        q, k, v = qkv
        q = q / jnp.sqrt(jnp.asarray(config.head_dim, q.dtype))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        out = lora(f"{blk}/attn/out/kernel", attn, "bthk,hkd->btd", "bthk,hkr->btr",
                   "btr,rd->btd")
        x = x + out + _get(params, f"{blk}/attn/out/bias")
        y = _layer_norm(_get(params, f"{blk}/ln_ffn"), x)
        y = lora(f"{blk}/ffn_in/kernel", y, "btd,df->btf", "btd,dr->btr", "btr,rf->btf")
        y = jax.nn.gelu(y + _get(params, f"{blk}/ffn_in/bias"))
        y = lora(f"{blk}/ffn_out/kernel", y, "btf,fd->btd", "btf,fr->btr", "btr,rd->btd")
        x = x + y + _get(params, f"{blk}/ffn_out/bias")
    logits = lora("head/kernel", _layer_norm(_get(params, "ln_f"), x), "btd,dv->btv",
                  "btd,dr->btr", "btr,rv->btv")
    return gpt.next_token_loss(logits, labels)


def handwritten_step(tx: optax.GradientTransformation, config: gpt.GPTConfig, alpha: float):
    """``(factors, params, opt_state, batch) -> (factors, opt_state, loss)``: Adam on the
    factors of :func:`handwritten_loss` (not jitted)."""

    def step(factors: Any, params: Any, opt_state: Any, batch: tuple[jax.Array, jax.Array]):
        loss, grads = jax.value_and_grad(handwritten_loss)(factors, params, batch, config, alpha)
        updates, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state, loss

    return step


def _get(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree

"""One table for `lorax.lora` and `lorax.infer_axes`: consumer patterns (rows) x properties.

A row (:data:`ROWS`) is a function ``fn(params, *args)`` and the way it consumes its kernels: a
Flax layer, a Gemma-style block, a raw ``x @ W``, a ``scan`` over a stacked kernel, a
``ragged_dot`` over experts, a pass-through primitive... A new primitive or consumer pattern is
a new row, not a new test file. Each property is one test over the rows:

1. identity at init (``b = 0``): ``lora(fn)(wrap(p)) == fn(p)``;
2. with random ``b``: ``fn`` on params whose kernels are ``W + s·a·b`` (float64 NumPy);
3. the factor gradients are that reference's (the chain rule through ``W + s·a·b`` by hand),
   ``W``'s is zero; and in bf16, the factorized model is the merged one;
4. no ``LoRAFallbackWarning`` from ``lora`` or ``infer_axes``;
5. ``wrap(p, axes=infer_axes(fn, p, *args))`` is accepted by ``lora(fn)``, has the layouts
   stated for the row and is what the row's own configuration (the defaults) gives;
6. the same values under ``jit``, remat, ``vmap`` and ``lax.scan`` (a row may skip one, saying
   why);
7. the train step's FLOPs are at most 1.05x a hand-written factorized step's, which computes
   the dense reference (checked without lorax).

``filterwarnings = error`` makes any warning a failure. Each row's values come from one
compile (:func:`program`) with XLA's cheap CPU options.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import gemma_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gemma_models import BIG, SMALL, path_of
from helpers import (
    assert_close,
    delta_eqn,
    dense_params,
    dense_params_jnp,
    factor_shapes,
    lora_nodes,
    perturb_b,
    tolerance,
)
from helpers import wrap_filled as filled
from jax import lax

import lorax

RANK = 2
FLOP_RANK = 4
BF16_ULPS = 8
TRANSFORMS = ("jit", "remat", "vmap", "scan")
# XLA's CPU backend spends most of this file's time in LLVM; its cheap settings halve the
# compiles and leave the HLO (what is computed, in which order) as it is.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Row:
    """One consumer pattern.

    Attributes:
        fn: ``fn(params, *args)`` on plain params.
        params: concrete params (abstract ones for the FLOP variants).
        args: the remaining arguments of ``fn``.
        wrap_kw: what the row passes to ``lorax.wrap`` besides ``rank`` (targets, layouts).
        layouts: ``{path: layout}`` written down from how ``fn`` uses each kernel, if stated.
        same_layout: whether ``wrap(**wrap_kw)`` and ``wrap(axes=infer_axes(...))`` give the
            same tree (False where a transposed 2-D use keeps the "io" default: both factorize).
        skip: ``{transform: why}`` for transforms the row does not support.
        hand: ``hand(params, {path: (a, b)}, scale, *args)``, the step written by hand as
            ``x·W + s·(x·a)·b`` with the factors in :attr:`layouts`.
        big: the row at the sizes its FLOPs are measured at (abstract params and args).
        reference: ``reference(wrapped, *args)`` replacing ``fn`` on the dense kernels, for
            rows whose expected value is not that (differentiable in the factors).
    """

    fn: Callable[..., Any]
    params: Any
    args: tuple
    wrap_kw: dict = dataclasses.field(default_factory=dict)
    layouts: dict | None = None
    same_layout: bool = True
    skip: dict = dataclasses.field(default_factory=dict)
    hand: Callable[..., Any] | None = None
    big: Callable[[], Row] | None = None
    reference: Callable[..., Any] | None = None


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _fill(abstract: Any, seed: int = 1) -> Any:
    """Random params for an abstract tree (NumPy, no compiles): kernels (ndim >= 2)
    ~ N(0, 1/fan_in) with fan_in the second-to-last axis, vectors ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def fill(s):
        if s.ndim >= 2:
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), s.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree.map(fill, abstract)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _linen(module: nn.Module, *args, **kw) -> Row:
    abstract = jax.eval_shape(module.init, jax.random.key(1), *args)["params"]
    return Row(lambda p, *xs: module.apply({"params": p}, *xs), _fill(abstract), args, **kw)


def _nnx(make: Callable[[], nnx.Module], *args, **kw) -> Row:
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return Row(lambda s, *xs: nnx.merge(graphdef, s)(*xs), _fill(abstract), args, **kw)


def _plain(fn, w_shape, *args, bias=False, name="proj", **kw) -> Row:
    """A raw dict ``{name: {"kernel": W}}`` (``name`` may be '/'-nested)."""
    leaf = {"kernel": jax.ShapeDtypeStruct(w_shape, jnp.float32)}
    if bias:
        leaf["bias"] = jax.ShapeDtypeStruct(w_shape[-1:], jnp.float32)
    for part in reversed(name.split("/")):
        leaf = {part: leaf}
    return Row(fn, _fill(leaf, seed=5), args, **kw)


# --- Flax layers and small modules ------------------------------------------------------------


class _RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(jnp.tanh(nn.Dense(8)(x)))


def _attend_row() -> Row:
    embed = nn.Embed(10, 6)
    abstract = jax.eval_shape(embed.init, jax.random.key(1), jnp.zeros((3, 4), jnp.int32))

    def fn(p, x):
        return embed.apply({"params": p}, x, method="attend")

    return Row(fn, _fill(abstract["params"]), (_normal(2, (3, 6)),),
               {"targets": "embedding"}, layouts={"embedding": "oi"}, same_layout=False)


def _conv_hand(p, f, s, x):
    w, bias = p["kernel"], p["bias"]
    a, b = f["kernel"]  # a (kh, kw, C, r): a convolution to r channels, then b

    def conv(k):
        return lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return conv(w) + bias[None, None, None] + s * jnp.einsum("nhwr,rf->nhwf", conv(a), b)


def _conv2d(big: bool = False) -> Row:
    c, f, size, batch = (32, 64, 16, 4) if big else (3, 4, 6, 2)
    x = _normal(2, (batch, size, size, c))
    return _linen(nn.Conv(f, (3, 3)), x, layouts={"kernel": "iiio"}, hand=_conv_hand)


def _embed_hand(p, f, s, ids):
    a, b = f["embedding"]
    return p["embedding"][ids] + s * jnp.einsum("btr,rd->btd", a[ids], b)


def _embed_lookup(big: bool = False) -> Row:
    vocab, d, ids_shape = (4096, 256, (4, 64)) if big else (10, 6, (2, 4))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, vocab, ids_shape), jnp.int32)
    return _linen(nn.Embed(vocab, d), ids, wrap_kw={"targets": "embedding"},
                  layouts={"embedding": "io"}, hand=_embed_hand)


def _sized(build: Callable[[bool], Row]) -> Callable[[], Row]:
    """The row ``build(big=False)``, its :attr:`Row.big` ``build(big=True)`` made abstract."""

    def big() -> Row:
        r = build(True)
        return dataclasses.replace(r, params=_abstract(r.params), args=_abstract(r.args))

    return lambda: dataclasses.replace(build(False), big=big)


# --- raw functions of a kernel ----------------------------------------------------------------


def _x_at_w_hand(p, f, s, x):
    a, b = f["proj/kernel"]
    w = lax.stop_gradient(p["proj"]["kernel"])
    return x @ w + p["proj"]["bias"][None] + s * ((x @ a) @ b)


def _x_at_w(big: bool = False) -> Row:
    d, f, n = (256, 512, 64) if big else (5, 6, 3)
    return _plain(lambda p, x: x @ p["proj"]["kernel"] + p["proj"]["bias"][None], (d, f),
                  _normal(2, (n, d)), bias=True, layouts={"proj/kernel": "io"},
                  hand=_x_at_w_hand)


def _cond_fn(p, x):
    w = p["proj"]["kernel"]
    s = jnp.sum(x)
    first = lax.cond(s > -jnp.inf, lambda w, x: x @ w, lambda w, x: jnp.tanh(x @ w), w, x)
    second = lax.cond(s < -jnp.inf, lambda w, x: x @ w, lambda w, x: jnp.tanh(x @ w), w, x)
    return first + 2.0 * second


def _nested_jit_fn(p, x):
    inner = jax.jit(lambda w, x: jnp.tanh(x @ w))
    outer = jax.jit(lambda w, x: inner(w, x) * 2.0 + x @ w)
    return outer(p["proj"]["kernel"], x)


def _inner_grad_fn(p, x):
    w = p["proj"]["kernel"]
    return jax.grad(lambda x: jnp.sum(jnp.tanh(x @ w)))(x)


def _lax_scan_fn(p, x):
    def body(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(body, x, p["proj"]["kernel"])[0]


# --- pass-through primitives: x @ g(W) --------------------------------------------------------


def _rp(x):
    return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def _rp_reference(lp, x):
    # lorax rounds W, a and b each (a rounded sum is not a sum of rounded terms).
    node = lp["proj"]["kernel"]
    return x @ _rp(node.w) + node.scale * ((x @ _rp(node.a)) @ _rp(node.b))


@jax.custom_jvp
def _jvp_identity(w):
    return w


@_jvp_identity.defjvp
def _jvp_identity_rule(primals, tangents):
    return primals[0], 0.5 * tangents[0]  # a rule lorax does not apply to the factors


@jax.custom_vjp
def _clip_grad(w):
    return w


_clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -1e-3, 1e-3),))


def _plain_reference(fn):
    """The plain LoRA value: ``fn`` (without the custom rule) on the dense kernels."""
    return lambda lp, *args: fn(dense_params_jnp(lp), *args)


def _x_at_g(g):
    return lambda p, x: x @ g(p["proj"]["kernel"])


# --- mixture of experts ------------------------------------------------------------------------


def _moe_ragged_fn(p, x, group_sizes):
    h = lax.ragged_dot(x, p["moe"]["experts"]["kernel"], group_sizes)
    return lax.ragged_dot(jnp.tanh(h), p["moe"]["experts_out"]["kernel"], group_sizes)


def _moe_ragged_hand(p, f, s, x, group_sizes):
    def proj(name, h):
        (a, b), w = f[f"moe/{name}/kernel"], lax.stop_gradient(p["moe"][name]["kernel"])
        low = lax.ragged_dot(lax.ragged_dot(h, a, group_sizes), b, group_sizes)
        return lax.ragged_dot(h, w, group_sizes) + s * low

    return proj("experts_out", jnp.tanh(proj("experts", x)))


def _moe_ragged(big: bool = False) -> Row:
    e, d, f, tokens = (8, 256, 512, 32) if big else (3, 4, 6, 7)
    params = {"moe": {"experts": {"kernel": jax.ShapeDtypeStruct((e, d, f), jnp.float32)},
                      "experts_out": {"kernel": jax.ShapeDtypeStruct((e, f, d), jnp.float32)}}}
    sizes = np.full(e, tokens // e)
    sizes[: tokens % e] += 1
    if not big:
        sizes = np.array([3, 0, 4])  # an empty group too
    return Row(_moe_ragged_fn, _fill(params, seed=5),
               (_normal(2, (tokens, d)), jnp.asarray(sizes, jnp.int32)),
               layouts={"moe/experts/kernel": "sio", "moe/experts_out/kernel": "sio"},
               hand=_moe_ragged_hand,
               # JAX itself: "ragged_dot vmap over any dim but 0 - NYI" (jax 0.10.2).
               skip={"vmap": "JAX's ragged_dot has no vmap rule for the batched input"})


def _moe_batched_hand(p, f, s, x):
    a, b = f["moe/experts/kernel"]
    w = lax.stop_gradient(p["moe"]["experts"]["kernel"])
    low = jnp.einsum("etr,erf->etf", jnp.einsum("etd,edr->etr", x, a), b)
    return jnp.einsum("etd,edf->etf", x, w) + s * low


def _moe_batched(big: bool = False) -> Row:
    e, d, f, t = (8, 256, 512, 4) if big else (3, 4, 6, 2)
    return _plain(lambda p, x: jnp.einsum("etd,edf->etf", x, p["moe"]["experts"]["kernel"]),
                  (e, d, f), _normal(2, (e, t, d)), name="moe/experts",
                  layouts={"moe/experts/kernel": "sio"}, hand=_moe_batched_hand)


# --- Gemma-style blocks (tests/gemma_models.py) -----------------------------------------------

RAW_TARGETS = ["^embed/table$", "^wq$", "^wo$", "^up$", "^down_t$"]


def _gemma(name: str, big: bool = False) -> Row:
    m = gemma_models.BUILDERS[name](BIG if big else SMALL)
    kernels = m.kernels
    # The raw dict's names say nothing: its kernels are named, and wq's layout stated.
    kw = {"targets": RAW_TARGETS, "axes": {"^wq$": "ioo"}} if name == "raw_dict" else {}
    return Row(m.apply, m.params(), (m.x,), kw, layouts={p: k.layout for p, k in kernels.items()},
               same_layout=all(k.default is None for k in kernels.values()), hand=m.hand)


X2 = (3, 5)
QKV = {"query/kernel": "ioo", "key/kernel": "ioo", "value/kernel": "ioo", "out/kernel": "iio"}
ROWS: dict[str, Callable[[], Row]] = {
    "dense": lambda: _linen(nn.Dense(6), _normal(2, X2), layouts={"kernel": "io"}),
    "dense_general_features": lambda: _linen(
        nn.DenseGeneral(features=(2, 3)), _normal(2, X2), wrap_kw={"in_axes": 1}),
    "dense_general_axis": lambda: _linen(
        nn.DenseGeneral(features=4, axis=(-2, -1)), _normal(2, (3, 2, 5)),
        layouts={"kernel": "iio"}),
    "linen_mha": lambda: _linen(
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), _normal(2, (2, 4, 6)),
        layouts=QKV),
    "nnx_mha": lambda: _nnx(
        lambda: nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8,
                                       decode=False, keep_rngs=False, rngs=nnx.Rngs(0)),
        _normal(2, (2, 4, 6)), layouts=QKV),
    "nnx_linear": lambda: _nnx(lambda: nnx.Linear(5, 6, rngs=nnx.Rngs(0)), _normal(2, X2),
                               layouts={"kernel": "io"}),
    "linen_einsum": lambda: _linen(
        nn.Einsum(shape=(6, 2, 3), einsum_str="btd,dhk->bthk"), _normal(2, (2, 4, 6)),
        wrap_kw={"in_axes": 1}),
    **{f"gemma_{n}": _sized(functools.partial(_gemma, n)) for n in (
        "linen_mqa", "linen_gqa", "linen_mha", "linen_scan", "linen_conv_local", "raw_dict")},
    "conv1d": lambda: _linen(nn.Conv(4, (3,)), _normal(2, (2, 7, 3))),
    "conv2d": _sized(_conv2d),
    "embed_lookup": _sized(_embed_lookup),
    "embed_attend": _attend_row,
    "nn_remat": lambda: _linen(nn.remat(_RematBlock)(), _normal(2, (3, 6))),
    "x_at_w": _sized(_x_at_w),
    "wT_at_xT": lambda: _plain(lambda p, x: p["proj"]["kernel"].T @ x.T, (5, 6),
                               _normal(2, X2)),
    "w_at_y": lambda: _plain(lambda p, y: p["proj"]["kernel"] @ y, (5, 6), _normal(2, (6, 3)),
                             layouts={"proj/kernel": "oi"}, same_layout=False),
    "jnp_einsum": lambda: _plain(lambda p, x: jnp.einsum("de,btd->bet", p["proj"]["kernel"], x),
                                 (5, 6), _normal(2, (2, 4, 5))),
    # Reshapes of the kernel stay factorized when they regroup input or output axes.
    "reshape_merge_out": lambda: _plain(
        lambda p, x: x @ p["proj"]["kernel"].reshape(5, 6), (5, 2, 3), _normal(2, X2),
        wrap_kw={"in_axes": 1}),
    "reshape_split_out": lambda: _plain(
        lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["proj"]["kernel"].reshape(5, 2, 3)),
        (5, 6), _normal(2, X2)),
    "reshape_merge_in": lambda: _plain(
        lambda p, x: x.reshape(3, 6) @ p["proj"]["kernel"].reshape(6, 4), (2, 3, 4),
        _normal(2, (3, 2, 3))),
    "lax_cond": lambda: _plain(_cond_fn, (5, 6), _normal(2, X2)),
    "nested_jit": lambda: _plain(_nested_jit_fn, (5, 5), _normal(2, X2)),
    "vmap_in_fn": lambda: _plain(
        lambda p, x: jax.vmap(lambda xi: jnp.tanh(xi @ p["proj"]["kernel"]))(x), (5, 6),
        _normal(2, X2)),
    "inner_grad": lambda: _plain(_inner_grad_fn, (5, 6), _normal(2, X2)),
    "lax_scan": lambda: _plain(_lax_scan_fn, (3, 5, 5), _normal(2, X2),
                               wrap_kw={"stacked": {"proj": 1}}, layouts={"proj/kernel": "sio"}),
    "moe_ragged": _sized(_moe_ragged),
    "moe_batched": _sized(_moe_batched),
    "optimization_barrier": lambda: _plain(_x_at_g(lax.optimization_barrier), (5, 6),
                                           _normal(2, X2)),
    # lorax applies reduce_precision to W, a and b each: x·rp(W) + s·(x·rp(a))·rp(b).
    "reduce_precision": lambda: _plain(_x_at_g(_rp), (5, 6), _normal(2, X2),
                                       reference=_rp_reference),
    # Identities with their own derivative rules: the kernel passes through factorized and
    # the factors get the plain LoRA gradients (the rules are not applied to them).
    "custom_jvp_identity": lambda: _plain(_x_at_g(_jvp_identity), (5, 6), _normal(2, X2),
                                          reference=_plain_reference(_x_at_g(lambda w: w))),
    "custom_vjp_identity": lambda: _plain(_x_at_g(_clip_grad), (5, 6), _normal(2, X2),
                                          reference=_plain_reference(_x_at_g(lambda w: w))),
}
FLOP_ROWS = ["x_at_w", "gemma_linen_mqa", "gemma_linen_gqa", "gemma_linen_mha",
             "gemma_linen_scan", "gemma_linen_conv_local", "gemma_raw_dict", "conv2d",
             "embed_lookup", "moe_ragged", "moe_batched"]


@functools.cache
def row(name: str) -> Row:
    return ROWS[name]()


# --- wrapping and the reference ---------------------------------------------------------------


def wrap_filled(r: Row) -> Any:
    """The row's params wrapped: ``a`` random, ``b`` zero (``helpers.wrap_filled``)."""
    return filled(r.params, rank=RANK, **r.wrap_kw)


def other_args(args: tuple, seed: int = 13) -> tuple:
    """A second input like ``args``: new normal floats, integers (ids, group sizes) reversed."""
    rng = np.random.default_rng(seed)

    def go(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.flip(x)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(go, args)


_COMPILED: dict[Any, Any] = {}


def compiled(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with :data:`FAST_COMPILE`, cached."""
    key = (fn, jax.tree.structure(args),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)
    return _COMPILED[key]


def _value_and_grad(f, lp, args, ct):
    """``f(lp, *args)`` and the gradient of ``sum(ct * f(lp, *args))`` wrt ``lp``."""
    y, vjp = jax.vjp(lambda t: f(t, *args), lp)
    return y, vjp(ct)[0]


@functools.cache
def program(name: str) -> dict[str, Any]:
    """Every value the row's properties 1-3 and 6 compare, in one compile: base, init, random-b
    and reference outputs; the gradients of ``sum(ct * y)`` through lorax and through the
    reference; ``lora(jax.jit(fn))`` and ``lora(jax.checkpoint(fn))`` (with its gradients), and
    ``lora(fn)`` under ``vmap`` and ``lax.scan`` over a leading axis of two inputs, whose
    references are computed per input without the transform."""
    r = row(name)
    lp0 = wrap_filled(r)
    lp = perturb_b(lp0, 7, std=0.3)
    ct = _normal(11, jax.eval_shape(r.fn, r.params, *r.args).shape)
    args2 = other_args(r.args)
    ref = r.reference

    def run(p, lp0, lp, dense, args, args2, ct):
        f = lorax.lora(r.fn)
        if dense is None:  # the row's own reference, differentiated as it stands
            (ref1, grad_ref), ref2 = _value_and_grad(ref, lp, args, ct), ref(lp, *args2)
        else:  # fn at the dense kernels; its kernel gradients to factor gradients below
            (ref1, grad_ref), ref2 = _value_and_grad(r.fn, dense, args, ct), r.fn(dense, *args2)
        y, g = _value_and_grad(f, lp, args, ct)
        out = {"base": r.fn(p, *args), "init": f(lp0, *args), "lora": y, "grad": g,
               "ref": ref1, "grad_ref": grad_ref, "ref_stack": jnp.stack([ref1, ref2])}
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), args, args2)
        # bf16 params, factors (b doubled: an adapter well above bf16 rounding) and inputs.
        lp16 = _to_bf16(jax.tree.map(lambda n: dataclasses.replace(n, b=2 * n.b) if
                                     lorax.is_lora(n) else n, lp, is_leaf=lorax.is_lora))
        out["bf16"] = (f(lp16, *_to_bf16(args)), r.fn(lorax.merge(lp16), *_to_bf16(args)))
        if "jit" not in r.skip:
            out["jit"] = lorax.lora(jax.jit(r.fn))(lp, *args)
        if "remat" not in r.skip:
            g = lorax.lora(jax.checkpoint(r.fn))
            out["remat"] = _value_and_grad(g, lp, args, ct)
        if "vmap" not in r.skip:
            out["vmap"] = jax.vmap(lambda *xs: f(lp, *xs))(*stacked)
        if "scan" not in r.skip:
            out["scan"] = lax.scan(lambda c, xs: (c, f(lp, *xs)), None, stacked)[1]
        return out

    # The reference kernels in float64 NumPy, unless the row states its own reference.
    dense = None if r.reference else dense_params(lp)
    inputs = (r.params, lp0, lp, dense, r.args, args2, ct)
    out = compiled(run, *inputs)(*inputs)
    if dense is not None:
        out["grad_ref"] = factor_grads(lp, out["grad_ref"])
    return {**out, "lp": lp}


def factor_grads(lp: Any, grads: Any) -> Any:
    """The chain rule through ``W + s·a·b`` by hand (float64 NumPy): each LoRA node of ``lp``
    with ``a``, ``b`` replaced by their gradients from ``G``, the gradient wrt that kernel in
    ``grads`` (a tree like the params); ``w`` gets ``G``, the other leaves their gradients."""

    def go(node, g):
        if not lorax.is_lora(node):
            return g
        ab, w = delta_eqn(node.roles).split("->")
        a_idx, b_idx = ab.split(",")
        a, b, g64 = (np.asarray(x, np.float64) for x in (node.a, node.b, g))
        da = node.scale * np.einsum(f"{w},{b_idx}->{a_idx}", g64, b)
        db = node.scale * np.einsum(f"{a_idx},{w}->{b_idx}", a, g64)
        return dataclasses.replace(node, w=g, a=da.astype(np.float32), b=db.astype(np.float32))

    return jax.tree.map(go, lp, grads, is_leaf=lorax.is_lora)


def _to_bf16(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


# --- 1-3: values and gradients ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROWS))
def test_identity_at_init(name):
    out = program(name)
    assert lora_nodes(out["lp"]), "the row wraps no kernel"
    assert_close(out["init"], out["base"])  # b = 0: the base, up to summation order


@pytest.mark.parametrize("name", sorted(ROWS))
def test_random_factors_match_dense_reference(name):
    out = program(name)
    # The adapter must visibly change the output, or the comparison proves nothing.
    assert _max_abs(out["ref"] - out["base"]) > 0.02 * max(_max_abs(out["ref"]), 1.0)
    assert_close(out["lora"], out["ref"])


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bf16_matches_merged(name):
    # bf16 keeps 8 significant bits (eps 2^-7): the factorized and the merged model round
    # differently (x·W + s·(x·a)·b against x·round(W + s·a@b)), by a few eps of the output's
    # scale (softmax amplifies logit errors); the adapter moves the output by far more, which
    # the power check below requires (measured: at most 2.3 eps apart, as the files before).
    out = program(name)
    y, merged = (np.asarray(v, np.float64) for v in out["bf16"])
    tol = tolerance(merged, dtype=jnp.bfloat16, ulps=BF16_ULPS)
    assert _max_abs(merged - out["base"]) > 3 * tol, "adapter too small to test"
    assert_close(y, merged, dtype=jnp.bfloat16, ulps=BF16_ULPS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_factor_gradients_match_dense_reference(name):
    out = program(name)
    _assert_grads(out["grad"], out["grad_ref"])


def _assert_grads(g_lora, g_ref):
    nodes, refs = lora_nodes(g_lora), lora_nodes(g_ref)
    assert [n.path for n in nodes] == [n.path for n in refs]
    for gl, gr in zip(nodes, refs, strict=True):
        assert not np.any(np.asarray(gl.w)), f"nonzero W gradient at {gl.path}"
        for field in ("a", "b"):
            got, want = np.asarray(getattr(gl, field)), np.asarray(getattr(gr, field))
            assert got.shape == want.shape and np.any(want), (gl.path, field)
            assert_close(got, want, err_msg=f"d/d{field} at {gl.path}")

    def others(g):  # biases, norm scales: the ordinary gradient
        return jax.tree.map(lambda x: None if lorax.is_lora(x) else x, g, is_leaf=lorax.is_lora)

    # Scaled by the largest of them: attention's key bias gets an exactly-zero gradient.
    rest = others(g_ref)
    assert_close(others(g_lora), rest,
                 scale=max(map(_max_abs, jax.tree.leaves(rest)), default=0.0))


# --- 4, 5: no fallback; infer_axes agrees with lora -------------------------------------------


@pytest.mark.parametrize("name", sorted(ROWS))
def test_no_fallback(name):
    r = row(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoRAFallbackWarning)
        jax.eval_shape(lorax.lora(r.fn), lorax.wrap(_abstract(r.params), rank=RANK,
                                                    **r.wrap_kw), *r.args)
        lorax.infer_axes(r.fn, r.params, *r.args)


def _roles(lp) -> dict[str, str]:
    return {n.path: n.roles for n in lora_nodes(lp)}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_inferred_axes_are_accepted_and_agree(name):
    r = row(name)
    p = _abstract(r.params)
    kw = {k: v for k, v in r.wrap_kw.items() if k not in ("axes", "in_axes", "stacked")}
    inferred = lorax.wrap(p, rank=RANK, **kw, axes=lorax.infer_axes(r.fn, r.params, *r.args))
    jax.eval_shape(lorax.lora(r.fn), inferred, *r.args)  # no layout error
    configured = lorax.wrap(p, rank=RANK, **r.wrap_kw)
    if r.layouts is not None:
        assert _roles(inferred) == r.layouts
    if r.same_layout:
        assert jax.tree.structure(configured) == jax.tree.structure(inferred)
    else:  # a transposed 2-D use keeps the "io" default: it factorizes all the same
        assert _roles(configured) == {p: "io" if v == "oi" else v
                                      for p, v in _roles(inferred).items()}


# --- 6: under transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("name, transform", [(n, t) for n in sorted(ROWS) for t in TRANSFORMS])
def test_under_transform(name, transform):
    r = row(name)
    if transform in r.skip:
        pytest.skip(r.skip[transform])
    out = program(name)
    if transform == "jit":
        assert_close(out["jit"], out["ref"])
    elif transform == "remat":
        y, g = out["remat"]
        assert_close(y, out["ref"])
        _assert_grads(g, out["grad_ref"])
    else:
        assert_close(out[transform], out["ref_stack"])


# --- 7: FLOPs against a hand-written factorized step ------------------------------------------


def _kernel_shapes(r: Row) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(r.params)[0]
    return {path_of(kp): tuple(x.shape) for kp, x in flat if path_of(kp) in r.layouts}


@pytest.mark.parametrize("name", FLOP_ROWS)
def test_hand_written_step_computes_the_dense_reference(name):
    # Without lorax: x·W + s·(x·a)·b by hand equals fn on W + s·a·b (NumPy float64 einsum from
    # the layout), for random factors; this is what the FLOP comparison below measures.
    r = row(name)
    rng = np.random.default_rng(3)
    factors, kernels = {}, {}
    for path, shape in _kernel_shapes(r).items():
        a_shape, b_shape = factor_shapes(shape, r.layouts[path], RANK)
        a, b = 0.3 * rng.standard_normal(a_shape), 0.3 * rng.standard_normal(b_shape)
        factors[path] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        kernels[path] = 0.5 * np.einsum(delta_eqn(r.layouts[path]), a, b)

    def dense(kp, w):
        d = kernels.get(path_of(kp))
        return w if d is None else jnp.asarray(np.asarray(w, np.float64) + d, jnp.float32)

    assert len(kernels) == len(r.layouts)
    p_dense = jax.tree_util.tree_map_with_path(dense, r.params)
    def run(p, p_dense, f, args):
        return r.fn(p_dense, *args), r.hand(p, f, 0.5, *args), r.fn(p, *args)

    inputs = (r.params, p_dense, factors, r.args)
    want, got, base = compiled(run, *inputs)(*inputs)
    assert _max_abs(want - base) > 0.02 * _max_abs(want)
    assert_close(got, want)


def _flops(fn, *args, compile: bool = False) -> float:
    """XLA's FLOP count of ``jax.jit(fn)`` on abstract ``args``: of the lowered HLO (no
    backend compile, seconds per step on this CPU), or of the optimized HLO with ``compile``
    (test_lowered_flops_match_compiled shows the two agree)."""
    lowered = jax.jit(fn).lower(*args)
    cost = None if compile else lowered.cost_analysis()
    if cost is None:  # compile=True, or a backend (GPU) without a cost model of lowered HLO
        cost = lowered.compile(compiler_options=FAST_COMPILE).cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def _loss(y):
    return jnp.mean(jnp.square(y))


@functools.cache
def step_flops(name: str, compile: bool = False) -> dict[str, float]:
    """FLOPs of the value and factor gradients of a scalar loss, through ``lorax.lora`` and
    through the row's hand-written ``x·stop_gradient(W) + s·(x·a)·b``, at the row's big sizes."""
    r = row(name).big()
    lp = lorax.wrap(r.params, rank=FLOP_RANK, **r.wrap_kw)
    (scale,) = {n.scale for n in lora_nodes(lp)}
    train, frozen = lorax.split(lp)

    def lora_step(t, frozen, args):
        return lorax.value_and_grad(
            lambda p: _loss(lorax.lora(r.fn)(p, *args)))(lorax.combine(t, frozen))

    factors = {}
    for path, shape in _kernel_shapes(r).items():
        a, b = factor_shapes(shape, r.layouts[path], FLOP_RANK)
        factors[path] = (jax.ShapeDtypeStruct(a, jnp.float32), jax.ShapeDtypeStruct(b, jnp.float32))

    def hand_step(factors, p, args):
        return jax.value_and_grad(lambda f: _loss(r.hand(p, f, scale, *args)))(factors)

    return {"lora": _flops(lora_step, train, frozen, r.args, compile=compile),
            "hand": _flops(hand_step, factors, r.params, r.args, compile=compile)}


@pytest.mark.parametrize("name", FLOP_ROWS)
def test_train_step_flops(name):
    c = step_flops(name)
    print(f"{name}: lora/hand = {c['lora'] / c['hand']:.4f}")
    assert c["lora"] <= 1.05 * c["hand"], c


def test_lowered_flops_match_compiled():
    # The optimized HLO (what XLA runs) counts the lowered HLO's FLOPs within 1%, so the
    # lowered counts above measure the compiled steps (checked on a row cheap to compile).
    name = "gemma_linen_conv_local"
    lowered, optimized = step_flops(name), step_flops(name, compile=True)
    for step in ("lora", "hand"):
        assert lowered[step] == pytest.approx(optimized[step], rel=0.01), (lowered, optimized)
    assert optimized["lora"] <= 1.05 * optimized["hand"], optimized


# --- a kernel consumed inside a custom_vjp: the one fallback ----------------------------------


@jax.custom_vjp
def _mm(x, w):
    return x @ w


def _mm_fwd(x, w):
    return x @ w, (x, w)


def _mm_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_mm.defvjp(_mm_fwd, _mm_bwd)


def test_kernel_consumed_by_custom_vjp_falls_back_in_lora_and_infer_axes():
    r = _plain(lambda p, x: _mm(x, p["proj"]["kernel"]), (5, 6), _normal(2, X2))
    lp = perturb_b(wrap_filled(r), 7, std=0.3)
    pattern = r"custom_vjp_call.*proj/kernel|proj/kernel.*custom_vjp_call"
    with pytest.warns(lorax.LoRAFallbackWarning, match=pattern):
        y = lorax.lora(r.fn)(lp, *r.args)
    assert_close(y, r.fn(dense_params(lp), *r.args))  # the merged kernel's value
    with pytest.warns(lorax.LoRAFallbackWarning, match=pattern):
        lorax.infer_axes(r.fn, r.params, *r.args)  # "unknown", as lora says


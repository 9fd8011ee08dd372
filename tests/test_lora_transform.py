"""`lorax.lora` against independent dense math, over every supported way a kernel is consumed.

Each case is a function ``fn(params, *args)`` of ordinary (unwrapped) params. For each, the
transformed ``lorax.lora(fn)`` on the wrapped tree must compute exactly what ``fn`` computes on
params whose kernels are replaced by ``W + s·a·b`` (NumPy float64 math in ``helpers``), with
gradients equal to those of that dense function of ``a`` and ``b``, and a zero gradient for
``W``. ``filterwarnings = error`` turns any ``LoRAFallbackWarning`` (a materialized kernel) into
a failure, so every case below also checks that its consumer is factorized.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    assert_close,
    dense_kernel,
    dense_params,
    dense_params_jnp,
    lora_nodes,
    perturb_b,
    tolerance,
)
from jax import lax

import lorax

RANK = 2
BF16_ULPS = 4


@dataclasses.dataclass
class Case:
    fn: Callable[..., Any]  # fn(params, *args) on plain params
    params: Any
    args: tuple
    wrap_kw: dict


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _fill(abstract: Any, seed: int = 1) -> Any:
    """Random params for an abstract tree without compiling an initializer: kernels (ndim >= 2)
    ~ N(0, 1/fan_in) with fan_in the second-to-last axis, vectors ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def fill(s):
        if s.ndim >= 2:
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), s.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree.map(fill, abstract)


def _linen(module: nn.Module, *args, wrap_kw=None) -> Case:
    abstract = jax.eval_shape(module.init, jax.random.key(1), *args)["params"]

    def fn(p, *xs):
        return module.apply({"params": p}, *xs)

    return Case(fn, _fill(abstract), args, wrap_kw or {})


def _nnx(make: Callable[[], nnx.Module], *args, wrap_kw=None) -> Case:
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return Case(lambda s, *xs: nnx.merge(graphdef, s)(*xs), _fill(abstract), args, wrap_kw or {})


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(8)(x)), None


class _ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        x, _ = stack(name="layers")(x, None)
        return x


class _RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(6)(x)


class _RematModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(_RematBlock)(name="block")(x)


def _plain(fn, w_shape, x, *, wrap_kw=None, bias=False) -> Case:
    params = {"proj": {"kernel": jax.ShapeDtypeStruct(w_shape, jnp.float32)}}
    if bias:
        params["proj"]["bias"] = jax.ShapeDtypeStruct(w_shape[-1:], jnp.float32)
    return Case(fn, _fill(params, seed=5), (x,), wrap_kw or {})


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


class _Attend(nn.Module):
    def setup(self):
        self.embed = nn.Embed(10, 6)

    def __call__(self, ids):
        return self.embed(ids)

    def attend(self, x):
        return self.embed.attend(x)


def _attend_case() -> Case:
    module = _Attend()
    ids = jnp.arange(12).reshape(3, 4) % 10
    abstract = jax.eval_shape(module.init, jax.random.key(1), ids)["params"]

    def fn(p, x):
        return module.apply({"params": p}, x, method=_Attend.attend)

    return Case(fn, _fill(abstract), (_normal(2, (3, 6)),), {"targets": "embedding"})


X2 = (3, 5)
BUILDERS: dict[str, Callable[[], Case]] = {
    "dense": lambda: _linen(nn.Dense(6), _normal(2, X2)),
    "dense_general_features": lambda: _linen(
        nn.DenseGeneral(features=(2, 3)), _normal(2, X2), wrap_kw={"in_axes": 1}
    ),
    "dense_general_axis": lambda: _linen(
        nn.DenseGeneral(features=4, axis=(-2, -1)), _normal(2, (3, 2, 5))
    ),
    "mha": lambda: _linen(
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), _normal(2, (2, 4, 6))
    ),
    "einsum": lambda: _linen(
        nn.Einsum(shape=(6, 2, 3), einsum_str="btd,dhk->bthk"), _normal(2, (2, 4, 6)),
        wrap_kw={"in_axes": 1},
    ),
    "conv1d": lambda: _linen(nn.Conv(4, (3,)), _normal(2, (2, 7, 3))),
    "conv2d": lambda: _linen(nn.Conv(4, (3, 3)), _normal(2, (2, 6, 6, 3))),
    "embed_lookup": lambda: _linen(
        nn.Embed(10, 6), jnp.array([[0, 3, 9, 3], [1, 2, 5, 7]]),
        wrap_kw={"targets": "embedding"},
    ),
    "embed_attend": _attend_case,
    "nn_scan": lambda: _linen(_ScanStack(), _normal(2, (3, 8)), wrap_kw={"stacked": {"layers": 1}}),
    "nn_remat": lambda: _linen(_RematModel(), _normal(2, (3, 6))),
    "nnx_linear": lambda: _nnx(lambda: nnx.Linear(5, 6, rngs=nnx.Rngs(0)), _normal(2, X2)),
    "nnx_mha": lambda: _nnx(
        lambda: nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8,
                                       decode=False, keep_rngs=False, rngs=nnx.Rngs(0)),
        _normal(2, (2, 4, 6)),
    ),
    "x_at_w": lambda: _plain(
        lambda p, x: x @ p["proj"]["kernel"] + p["proj"]["bias"][None], (5, 6), _normal(2, X2),
        bias=True,
    ),
    "wT_at_xT": lambda: _plain(lambda p, x: p["proj"]["kernel"].T @ x.T, (5, 6), _normal(2, X2)),
    "w_at_y": lambda: _plain(lambda p, y: p["proj"]["kernel"] @ y, (5, 6), _normal(2, (6, 3))),
    "jnp_einsum": lambda: _plain(
        lambda p, x: jnp.einsum("de,btd->bet", p["proj"]["kernel"], x), (5, 6),
        _normal(2, (2, 4, 5)),
    ),
    # Reshapes of the kernel stay factorized when they regroup input or output axes.
    "reshape_merge_out": lambda: _plain(
        lambda p, x: x @ p["proj"]["kernel"].reshape(5, 6), (5, 2, 3), _normal(2, X2),
        wrap_kw={"in_axes": 1},
    ),
    "reshape_split_out": lambda: _plain(
        lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["proj"]["kernel"].reshape(5, 2, 3)),
        (5, 6), _normal(2, X2),
    ),
    "reshape_merge_in": lambda: _plain(
        lambda p, x: x.reshape(3, 6) @ p["proj"]["kernel"].reshape(6, 4), (2, 3, 4),
        _normal(2, (3, 2, 3)),
    ),
    "lax_cond": lambda: _plain(_cond_fn, (5, 6), _normal(2, X2)),
    "nested_jit": lambda: _plain(_nested_jit_fn, (5, 5), _normal(2, X2)),
    "vmap": lambda: _plain(
        lambda p, x: jax.vmap(lambda xi: jnp.tanh(xi @ p["proj"]["kernel"]))(x), (5, 6),
        _normal(2, X2),
    ),
    "inner_grad": lambda: _plain(_inner_grad_fn, (5, 6), _normal(2, X2)),
    "lax_scan": lambda: _plain(
        _lax_scan_fn, (3, 5, 5), _normal(2, X2), wrap_kw={"stacked": {"proj": 1}}
    ),
}


@functools.cache
def _case(name: str) -> Case:
    return BUILDERS[name]()


@pytest.fixture(params=sorted(BUILDERS))
def case(request) -> Case:
    return _case(request.param)


def _wrap(case: Case, params=None, **kw) -> Any:
    return lorax.wrap(case.params if params is None else params, rank=RANK,
                      **{**case.wrap_kw, **kw})


def _perturbed(case: Case, params=None, **kw) -> Any:
    return perturb_b(_wrap(case, params, **kw), jax.random.key(7))


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64))))


@functools.cache
def _forward(name: str) -> dict[str, Any]:
    """Every forward value the forward tests compare, computed once per case."""
    case = _case(name)
    f_base = jax.jit(case.fn)
    f_lora = jax.jit(lorax.lora(case.fn))
    lp0 = _wrap(case)
    lp = perturb_b(lp0, jax.random.key(7))
    return {
        "lp0": lp0,
        "lp": lp,
        "base": np.asarray(f_base(case.params, *case.args)),
        "init": np.asarray(f_lora(lp0, *case.args)),
        "lora": np.asarray(f_lora(lp, *case.args)),
        "eager": np.asarray(lorax.lora(case.fn)(lp, *case.args)),
        "dense": np.asarray(f_base(dense_params(lp), *case.args)),
        "merged": np.asarray(f_base(lorax.merge(lp), *case.args)),
    }


@pytest.fixture(params=sorted(BUILDERS))
def forward(request) -> dict[str, Any]:
    return _forward(request.param)


def test_every_case_adapts_something(forward):
    nodes = lora_nodes(forward["lp0"])
    assert nodes, "the case wraps no kernel"
    assert all(float(np.max(np.abs(n.a))) > 0 and not np.any(n.b) for n in nodes)


def test_identity_at_init(forward):
    assert_close(forward["init"], forward["base"])


def test_perturbed_matches_dense_math(forward):
    y, y_dense = forward["lora"], forward["dense"]
    scale = max(_max_abs(y_dense), 1.0)
    # The adapter must visibly change the output, or this comparison proves nothing.
    assert _max_abs(y_dense - forward["base"]) > 1e-2 * scale
    assert_close(y, y_dense)


def test_perturbed_matches_merged_params(forward):
    assert_close(forward["lora"], forward["merged"])


def test_jit_matches_eager(forward):
    assert_close(forward["lora"], forward["eager"])


def test_merge_matches_dense_math(forward):
    lp = forward["lp"]
    merged = lorax.merge(lp)
    kernels = _merged_kernels(lp, merged)
    for node, kernel in zip(lora_nodes(lp), kernels, strict=True):
        assert kernel.shape == node.w.shape and kernel.dtype == node.w.dtype
        assert_close(kernel, dense_kernel(node), err_msg=node.path)


def _merged_kernels(lp, merged) -> list:
    # Leaves of `merged` at the positions the LoRA nodes held in `lp`.
    marks = jax.tree.map(lorax.is_lora, lp, is_leaf=lorax.is_lora)
    return [m for m, flag in zip(jax.tree.leaves(merged), jax.tree.leaves(marks), strict=True)
            if flag]


def test_grad_matches_dense_and_w_gets_zero(case):
    lp = _perturbed(case)
    out = jax.eval_shape(case.fn, case.params, *case.args)
    ct = _normal(11, out.shape)

    def loss_lora(t):
        return jnp.sum(ct * lorax.lora(case.fn)(t, *case.args))

    def loss_dense(t):
        return jnp.sum(ct * case.fn(dense_params_jnp(t), *case.args))

    g_lora = jax.jit(jax.grad(loss_lora))(lp)
    g_dense = jax.jit(jax.grad(loss_dense))(lp)
    nodes_lora, nodes_dense = lora_nodes(g_lora), lora_nodes(g_dense)
    assert len(nodes_lora) == len(nodes_dense) == len(lora_nodes(lp))
    for gl, gd in zip(nodes_lora, nodes_dense, strict=True):
        assert not np.any(np.asarray(gl.w)), f"nonzero W gradient at {gl.path}"
        assert np.any(np.asarray(gd.w)), "the dense reference should give W a gradient"
        for name in ("a", "b"):
            ref = np.asarray(getattr(gd, name))
            got = np.asarray(getattr(gl, name))
            assert got.shape == ref.shape
            assert np.any(ref), f"zero reference gradient for {name} at {gl.path}"
            assert_close(got, ref, err_msg=f"d/d{name} at {gl.path}")
    # Every other leaf (biases, LayerNorm scales) gets the ordinary gradient.
    def others(g):
        return jax.tree.map(lambda x: None if lorax.is_lora(x) else x, g, is_leaf=lorax.is_lora)

    # Scaled by the largest of them: attention's key bias gets an exactly-zero gradient (the
    # softmax ignores it), so its rounding noise is relative to the other gradients' size.
    rest = others(g_dense)
    assert_close(others(g_lora), rest, scale=max(map(_max_abs, jax.tree.leaves(rest)), default=0.0))


def _to_bf16(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def test_bf16_lora_matches_merged_forward(case):
    params16 = _to_bf16(case.params)
    args16 = _to_bf16(case.args)
    lp = perturb_b(_wrap(case, params16), jax.random.key(7), std=0.5)
    assert all(n.a.dtype == n.b.dtype == jnp.bfloat16 for n in lora_nodes(lp))
    y = np.asarray(jax.jit(lorax.lora(case.fn))(lp, *args16), np.float64)
    y_merged = np.asarray(jax.jit(case.fn)(lorax.merge(lp), *args16), np.float64)
    y_base = np.asarray(jax.jit(case.fn)(params16, *args16), np.float64)
    # bf16 keeps 8 significant bits (eps 2^-7). The two paths differ by one bf16 rounding of
    # the merged kernel and by bf16 roundings of the separate x@W, x@a and (x@a)@b products
    # and of their sum; each rounding is relative to the terms summed, and attention's softmax
    # amplifies logit errors, so an element's error is a few eps of the output's scale (its
    # max). A wrong delta (a missing scale, a transposed factor) moves the output by the
    # adapter's own size; the check below requires that to exceed the tolerance several times
    # over somewhere, so the comparison has power (b ~ N(0, 0.5^2) makes the adapter large;
    # measured: the error is at most 1.8 eps of the scale, the adapter at least 18).
    tol = tolerance(y_merged, dtype=jnp.bfloat16, ulps=BF16_ULPS)
    assert np.any(np.abs(y_merged - y_base) > 3 * tol), "perturbation too small to detect"
    assert_close(y, y_merged, dtype=jnp.bfloat16, ulps=BF16_ULPS)


# --- errors, fallbacks, dropout ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["dense_general_features", "einsum"])
def test_in_axes_mismatch_raises(name):
    case = _case(name)
    lp = lorax.wrap(case.params, rank=RANK)  # default in_axes: all axes but the last
    path = lora_nodes(lp)[0].path
    with pytest.raises(ValueError) as err:
        lorax.lora(case.fn)(lp, *case.args)
    msg = str(err.value)
    assert "in_axes" in msg and path in msg, msg


def test_unsupported_consumer_falls_back_with_warning():
    w = _normal(3, (5, 6))
    x = _normal(4, X2)
    params = {"proj": {"kernel": w}}

    def fn(p, x):
        k = p["proj"]["kernel"]
        return x @ k + jnp.sum(k**2)

    lp = perturb_b(lorax.wrap(params, rank=RANK), jax.random.key(3))
    with pytest.warns(lorax.LoRAFallbackWarning, match="proj/kernel") as record:
        y = lorax.lora(fn)(lp, x)
    assert any("proj/kernel" in str(r.message) and "`" in str(r.message) for r in record)
    expected = fn(dense_params(lp), x)
    assert_close(y, expected)


def test_fallback_warning_names_primitive():
    params = {"proj": {"kernel": _normal(3, (5, 6))}}
    lp = lorax.wrap(params, rank=RANK)
    with pytest.warns(lorax.LoRAFallbackWarning) as record:
        lorax.lora(lambda p: jnp.sin(p["proj"]["kernel"]))(lp)
    msgs = [str(r.message) for r in record]
    assert any("`sin`" in m and "'proj/kernel'" in m for m in msgs), msgs


@pytest.fixture(scope="module")
def dropout_setup():
    case = _case("dense")
    lp = perturb_b(lorax.wrap(case.params, rank=RANK, dropout=0.5), jax.random.key(7))
    lp0 = perturb_b(lorax.wrap(case.params, rank=RANK, dropout=0.0), jax.random.key(7))
    x = _normal(9, (16, 5))
    return jax.jit(lorax.lora(case.fn)), lp, lp0, x


def test_dropout_without_key_is_deterministic(dropout_setup):
    f, lp, lp0, x = dropout_setup
    y1, y2 = np.asarray(f(lp, x)), np.asarray(f(lp, x))
    assert np.array_equal(y1, y2)
    # Without a key dropout is off: the node's rate does not matter.
    assert np.array_equal(y1, np.asarray(f(lp0, x)))
    assert_close(y1, _case("dense").fn(dense_params(lp), x))


def test_dropout_with_key(dropout_setup):
    f, lp, _, x = dropout_setup
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y = np.asarray(f(lp, x))
    y1 = np.asarray(f(lp, x, lora_key=k1))
    assert not np.allclose(y1, y), "dropout with a key should change the output"
    assert np.array_equal(y1, np.asarray(f(lp, x, lora_key=k1))), "same key, same output"
    assert not np.allclose(y1, np.asarray(f(lp, x, lora_key=k2))), "different keys"
    # Dropout acts on the adapter branch only: with b = 0 a key changes nothing.
    case = _case("dense")
    lp_init = lorax.wrap(case.params, rank=RANK, dropout=0.5)
    np.testing.assert_array_equal(np.asarray(f(lp_init, x, lora_key=k1)),
                                  np.asarray(f(lp_init, x)))


def test_dropout_rate_zero_ignores_key(dropout_setup):
    f, _, lp0, x = dropout_setup
    assert np.array_equal(np.asarray(f(lp0, x, lora_key=jax.random.key(1))), np.asarray(f(lp0, x)))

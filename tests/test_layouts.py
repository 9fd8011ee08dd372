"""Kernel layouts on Gemma-style models: ``axes=``, ``lorax.infer_axes``, the zero-config
defaults, and the errors that name the spec that works.

The models (``tests/gemma_models.py``) are small Gemma-style blocks in Linen and NNX (MQA, GQA
and MHA attention, a gated MLP in the new (2, F, D) and the old (2, D, F) style), an ``nn.scan``
stack, a locally connected convolution and a raw dict of arrays, each kernel's layout written
down by hand from the model's einsums. Their numerics (identity at init, the dense reference,
factor gradients, FLOPs, bf16) are rows of ``tests/test_conformance.py``; here: which layout
each way of choosing one gives (trace only), the suggestions, and wrap's argument checks.
"""

from __future__ import annotations

import ast
import functools
import re
import time
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from gemma_models import BUILDERS, SMALL, Kernel, Model, path_of
from helpers import factor_shapes, lora_nodes

import lorax

RANK = 2
# Models whose every kernel lorax.wrap's zero-config defaults must get right.
# A scan named `layers` (Flax's convention) is read as a stack; `blocks` is not.
DEFAULT_OK = [n for n in BUILDERS if n not in ("linen_scan_blocks", "raw_dict")]
# The raw dict has no Flax names: its kernels are named explicitly.
RAW_TARGETS = ["^embed/table$", "^wq$", "^wo$", "^up$", "^down_t$"]
# (model, how its layouts are chosen).
MODES = [(n, "default") for n in DEFAULT_OK] + [
    ("linen_scan_blocks", "suggested"), ("raw_dict", "suggested"),
] + [(n, "infer") for n in BUILDERS]


@functools.cache
def model(name: str) -> Model:
    return BUILDERS[name](SMALL)


def _base_kw(name: str) -> dict:
    return {"targets": RAW_TARGETS} if name == "raw_dict" else {}


def _paths_of(tree) -> list[str]:
    return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _resolve(spec: dict[str, str], paths: list[str]) -> dict[str, str]:
    """``{regex or path: layout}`` -> ``{path: layout}``; each key must name exactly one path."""
    out = {}
    for key, layout in spec.items():
        hits = [p for p in paths if re.search(key, p)]
        assert len(hits) == 1, f"{key!r} matches {hits} of {paths}"
        assert hits[0] not in out, f"two keys name {hits[0]!r}: {spec}"
        out[hits[0]] = layout
    return out


# --- the spec an error message names ----------------------------------------------------------

_SPEC = re.compile(r"\b(axes|stacked|in_axes)=(\{[^{}]*\})")


def suggested_specs(message: str) -> dict[str, dict]:
    """``{argname: {regex: value}}`` for every ``axes=``/``stacked=``/``in_axes=`` dict literal
    in an error message."""
    out: dict[str, dict] = {}
    for arg, text in _SPEC.findall(message):
        value = ast.literal_eval(text)
        assert isinstance(value, dict) and value, f"not a spec: {arg}={text}"
        out.setdefault(arg, {}).update(value)
    return out


def follow_suggestions(m: Model, p: Any, kw: dict, prefer: str = "axes"):
    """Wraps with ``kw`` and, while ``lorax.lora`` raises ValueError, applies the spec the
    message names literally (only the ``prefer`` argument's spec when the message offers
    several). Returns the final kwargs and the messages seen."""
    kw, messages = dict(kw), []
    for _ in range(len(m.kernels) + 1):
        lp = lorax.wrap(p, rank=RANK, **kw)
        try:
            jax.eval_shape(lorax.lora(m.apply), lp, m.x)
            return kw, messages
        except ValueError as err:
            msg = str(err)
            messages.append(msg)
            specs = suggested_specs(msg)
            assert specs, f"the error names no spec to pass: {msg}"
            if prefer in specs:
                specs = {prefer: specs[prefer]}
            for arg, value in specs.items():
                # The new regexes first (the first match wins), replacing equal ones.
                kw[arg] = {**value, **{k: v for k, v in kw.get(arg, {}).items()
                                       if k not in value}}
    raise AssertionError(f"still failing after {len(messages)} suggestions: {messages}")


@functools.cache
def wrap_kw(name: str, mode: str) -> dict:
    m, kw = model(name), _base_kw(name)
    if mode == "infer":
        return {**kw, "axes": lorax.infer_axes(m.apply, m.abstract, m.x)}
    if mode == "suggested":
        return follow_suggestions(m, m.abstract, kw)[0]
    return kw


def expected_layouts(name: str, mode: str) -> dict[str, str]:
    """{path: layout}: the einsums' facts; for the defaults, a transposed 2-D use may keep the
    default "io" (it factorizes all the same)."""
    ks = model(name).kernels
    if mode == "infer":
        return {p: k.layout for p, k in ks.items()}
    return {p: k.default or k.layout for p, k in ks.items()}


def layout_of(node: lorax.LoRA) -> str:
    """The node's layout string (``None`` standing for the canonical ``(*stack, *in, *out)``)."""
    if node.layout is not None:
        return node.layout.replace(" ", "")
    return "s" * node.n_stack + "i" * node.n_in + "o" * (node.w.ndim - node.n_stack - node.n_in)


# --- layouts ----------------------------------------------------------------------------------


def test_infer_axes_on_concrete_params_and_abstract_input():
    m = model("nnx_gqa")
    x = jax.ShapeDtypeStruct(m.x.shape, m.x.dtype)
    assert lorax.infer_axes(m.apply, model("nnx_gqa").params(), x) == \
        lorax.infer_axes(m.apply, m.abstract, m.x)


@pytest.mark.parametrize("name, mode", MODES)
def test_layout_and_factor_shapes(name, mode):
    m = model(name)
    lp = lorax.wrap(m.abstract, rank=RANK, **wrap_kw(name, mode))
    nodes = {n.path: n for n in lora_nodes(lp)}
    assert {path: layout_of(n) for path, n in nodes.items()} == expected_layouts(name, mode)
    for path, node in nodes.items():
        shapes = factor_shapes(m.kernels[path].shape, layout_of(node), RANK)
        assert (node.a.shape, node.b.shape) == shapes, path
    jax.eval_shape(lorax.lora(m.apply), lp, m.x)  # accepted: no layout error, no fallback
    # merge gives back the original tree: every kernel in its own layout.
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(lorax.merge, lp), m.abstract)


def test_abstract_params_wrap_to_abstract_factors():
    m = model("linen_mqa")
    lp = lorax.wrap(m.abstract, rank=RANK, axes=lorax.infer_axes(m.apply, m.abstract, m.x))
    for node in lora_nodes(lp):
        k = m.kernels[node.path]
        assert isinstance(node.a, jax.ShapeDtypeStruct) and isinstance(node.b,
                                                                       jax.ShapeDtypeStruct)
        assert (node.a.shape, node.b.shape) == factor_shapes(k.shape, k.layout, RANK)
    out = jax.eval_shape(lorax.lora(m.apply), lp, m.x)
    assert out.shape == m.x.shape


# --- standard Flax layers: zero-config layouts (trace only: their numerics are in
# test_conformance.py) --------------------------------------------------------------------


def _linen_layer(module, x, targets=None):
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return (lambda p, x: module.apply({"params": p}, x)), abstract, x, targets


def _nnx_layer(make, x, targets=None):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), abstract, x, targets


def _S(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


# (Linen's Dense, DenseGeneral, MHA, Conv, Embed and NNX's Linear and MHA: rows of the table.)
FLAX_LAYERS = {  # name: (builder, {path: layout})
    "nnx_linear_general_axis": (
        lambda: _nnx_layer(lambda: nnx.LinearGeneral((2, 5), 4, axis=(-2, -1),
                                                     rngs=nnx.Rngs(0)), _S(2, 2, 5)),
        {"kernel": "iio"}),
    "nnx_conv": (lambda: _nnx_layer(lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
                                    _S(2, 6, 6, 3)), {"kernel": "iiio"}),
    "nnx_embed": (lambda: _nnx_layer(lambda: nnx.Embed(10, 6, rngs=nnx.Rngs(0)),
                                     _S(2, 4, dtype=jnp.int32), "embedding"),
                  {"embedding": "io"}),
}


@pytest.mark.parametrize("name", sorted(FLAX_LAYERS))
def test_flax_layers_zero_config(name):
    build, expected = FLAX_LAYERS[name]
    fn, abstract, x, targets = build()
    lp = lorax.wrap(abstract, rank=2, targets=targets)
    assert {n.path: layout_of(n) for n in lora_nodes(lp)} == expected
    jax.eval_shape(lorax.lora(fn), lp, x)  # no layout error, no fallback warning
    assert _resolve(lorax.infer_axes(fn, abstract, x), _paths_of(abstract)) == expected


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_dense_general_features_error_names_the_fix(name):
    # A (5, 2, 3) DenseGeneral kernel is (in, *features) here but (*in, out) with
    # axis=(-2, -1): its shape does not tell, so the default may miss; the error then names the
    # spec that works.
    if name == "linen":
        fn, abstract, x, _ = _linen_layer(nn.DenseGeneral((2, 3)), _S(2, 5))
    else:
        fn, abstract, x, _ = _nnx_layer(
            lambda: nnx.LinearGeneral(5, (2, 3), rngs=nnx.Rngs(0)), _S(2, 5))
    m = Model(name, fn, abstract, x, {"kernel": Kernel("ioo", (5, 2, 3))})
    kw, _ = follow_suggestions(m, abstract, {})
    (node,) = lora_nodes(lorax.wrap(abstract, rank=RANK, **kw))
    assert layout_of(node) == "ioo"
    assert _resolve(lorax.infer_axes(fn, abstract, x), ["kernel"]) == {"kernel": "ioo"}


# --- mismatches name the spec that works ------------------------------------------------------


def test_scan_default_names_the_fix():
    m = model("linen_scan_blocks")
    lp = lorax.wrap(m.abstract, rank=RANK)
    with pytest.raises(ValueError) as err:
        jax.eval_shape(lorax.lora(m.apply), lp, m.x)
    msg = str(err.value)
    assert "blocks/mlp/kernel" in msg, msg
    specs = suggested_specs(msg)
    assert specs.get("stacked") == {"^blocks/mlp/kernel$": 1} or \
        specs.get("axes") == {"^blocks/mlp/kernel$": "sio"}, msg


@pytest.mark.parametrize("prefer", ["axes", "stacked"])
def test_scan_suggestions_applied_literally_work(prefer):
    # (The numerics of the suggested spec: the linen_scan-suggested cases above.)
    m, p = model("linen_scan_blocks"), model("linen_scan_blocks").abstract
    kw, messages = follow_suggestions(m, p, {}, prefer=prefer)
    assert messages, "the default should not fit the scanned Dense kernel"
    nodes = lora_nodes(lorax.wrap(p, rank=RANK, **kw))
    assert {n.path: layout_of(n) for n in nodes} == expected_layouts("linen_scan_blocks",
                                                                     "infer")


@pytest.mark.parametrize("name, wrong", [
    # Each wrong layout puts a contracted axis and a kept axis in one group.
    ("linen_mqa", {"q_einsum": "ioo"}),
    ("nnx_gqa", {"kv_einsum": "sioo"}),
    ("linen_mha", {"attn_vec_einsum": "oio"}),
    ("linen_gqa", {"q_einsum": "ooi"}),
    ("raw_dict", {"^wq$": "iio"}),
])
def test_wrong_axes_error_names_a_working_spec(name, wrong):
    m = model(name)
    p = m.abstract
    kw = {**_base_kw(name), "axes": wrong}
    lp = lorax.wrap(p, rank=RANK, **kw)
    with pytest.raises(ValueError) as err:
        jax.eval_shape(lorax.lora(m.apply), lp, m.x)
    assert suggested_specs(str(err.value)), str(err.value)
    kw, _ = follow_suggestions(m, p, kw)
    lp = lorax.wrap(p, rank=RANK, **kw)
    (path,) = [q for q in m.kernels if re.search(next(iter(wrong)), q)]
    node = {n.path: n for n in lora_nodes(lp)}[path]
    assert layout_of(node) == m.kernels[path].layout


def test_old_forms_still_work():
    wq = jax.ShapeDtypeStruct((32, 4, 8), jnp.float32)
    (node,) = lora_nodes(lorax.wrap({"wq": wq}, rank=2, targets="^wq$", in_axes=1))
    assert layout_of(node) == "ioo" and node.a.shape == (32, 2)
    (node,) = lora_nodes(lorax.wrap({"wq": wq}, rank=2, targets="^wq$",
                                    stacked={"^wq$": 1}))
    assert layout_of(node) == "sio"
    assert (node.a.shape, node.b.shape) == ((32, 4, 2), (32, 2, 8))
    (node,) = lora_nodes(lorax.wrap({"wq": wq}, rank=2, targets="^wq$", axes="oio"))
    assert (node.a.shape, node.b.shape) == ((4, 2), (2, 32, 8))


@pytest.mark.parametrize("axes", ["oi", "oiox", "ooo", "iii", "sss", {"^wq$": "oi"}])
def test_bad_axes_rejected_at_wrap(axes):
    # One letter per axis, from s/i/o, with at least one input and one output axis.
    with pytest.raises((ValueError, TypeError)) as err:
        lorax.wrap({"wq": jax.ShapeDtypeStruct((32, 4, 8), jnp.float32)}, rank=2,
                   targets="^wq$", axes=axes)
    assert "axes" in str(err.value) and "wq" in str(err.value), str(err.value)


# --- a 7B-size abstract tree ------------------------------------------------------------------

LAYERS, D7, HEADS, KV, HD, FFN, VOCAB = 32, 4096, 32, 8, 128, 11008, 256_000


def _gemma_like_7b() -> dict:
    def S(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def layer():
        return {
            "pre_attention_norm": {"scale": S(D7)},
            "attn": {
                "q_einsum": {"w": S(HEADS, D7, HD)},
                "kv_einsum": {"w": S(2, KV, D7, HD)},
                "attn_vec_einsum": {"w": S(HEADS, HD, D7)},
            },
            "pre_ffw_norm": {"scale": S(D7)},
            "mlp": {"gating_einsum": S(2, FFN, D7), "linear": S(FFN, D7)},
        }

    return {"embedder": {"input_embedding": S(VOCAB, D7)},
            **{f"layer_{i}": layer() for i in range(LAYERS)},
            "final_norm": {"scale": S(D7)}}


def test_7b_abstract_tree_wraps_fast_with_gemma_defaults():
    tree = _gemma_like_7b()
    lorax.wrap({"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}, rank=2)  # warm-up
    start = time.perf_counter()
    lp = lorax.wrap(tree, rank=8)
    elapsed = time.perf_counter() - start
    print(f"wrap of the 7B-size tree: {elapsed:.3f} s")
    assert elapsed <= 1.0, f"wrap took {elapsed:.2f} s"
    nodes = {n.path: n for n in lora_nodes(lp)}
    assert len(nodes) == 5 * LAYERS
    expected = {"attn/q_einsum/w": ("oio", (D7, 8), (8, HEADS, HD)),
                "attn/kv_einsum/w": ("soio", (2, D7, 8), (2, 8, KV, HD)),
                "attn/attn_vec_einsum/w": ("iio", (HEADS, HD, 8), (8, D7)),
                "mlp/gating_einsum": ("soi", (2, D7, 8), (2, 8, FFN)),
                "mlp/linear": ("io", (FFN, 8), (8, D7))}
    for i in (0, LAYERS - 1):
        for suffix, (layout, a, b) in expected.items():
            node = nodes[f"layer_{i}/{suffix}"]
            assert layout_of(node) == layout
            assert (node.a.shape, node.b.shape) == (a, b)
            # bf16 kernels get float32 factors by default.
            assert isinstance(node.a, jax.ShapeDtypeStruct) and node.a.dtype == jnp.float32
    per_layer = 8 * ((D7 + HEADS * HD) + 2 * (D7 + KV * HD) + (HEADS * HD + D7)
                     + 2 * (D7 + FFN) + (FFN + D7))
    assert lorax.summary(lp).trainable == LAYERS * per_layer


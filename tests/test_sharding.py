"""Sharded factors: derived PartitionSpecs, spec trees for jit, and placement by ``lorax.wrap``.

Spec-level checks run here on one device. The placement checks need several devices, and
``XLA_FLAGS`` must be set before jax is imported, so they run this file as a script in a
subprocess with 8 CPU devices (``python tests/test_sharding.py REPORT.json``) and the tests read
its JSON report.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, cpu_devices_env
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorax

ROOT = Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct


def _nodes(tree: Any) -> dict[str, lorax.LoRA]:
    return {n.path: n for n in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(n)}


def _one_device_mesh(*names: str) -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


# ----------------------------------------------------------------------------- factor_specs


@pytest.mark.parametrize(
    "spec, ndim, kw, expected",
    [
        (P(None, "model"), 2, {}, (P(None, None), P(None, "model"))),  # column-parallel
        (P("model", None), 2, {}, (P("model", None), P(None, None))),  # row-parallel
        (P("fsdp"), 2, {}, (P("fsdp", None), P(None, None))),  # short spec: padded
        (P(None, ("data", "model")), 2, {}, (P(None, None), P(None, ("data", "model")))),
        (P(), 3, {"n_in": 1}, (P(None, None), P(None, None, None))),
        (P(None, "model", None), 3, {"n_in": 1}, (P(None, None), P(None, "model", None))),
        (P("model", None, "fsdp"), 3, {}, (P("model", None, None), P(None, "fsdp"))),
        (P("stage", "fsdp", "model"), 3, {"n_stack": 1},
         (P("stage", "fsdp", None), P("stage", None, "model"))),
    ],
)
def test_factor_specs(spec, ndim, kw, expected):
    assert lorax.factor_specs(spec, ndim, **kw) == expected


def test_factor_specs_from_a_node_uses_its_axes():
    params = {"attn": {"query": {"kernel": jnp.ones((16, 4, 8))},
                       "out": {"kernel": jnp.ones((4, 8, 16))}}}
    nodes = _nodes(lorax.wrap(params, rank=2))
    q, o = nodes["attn/query/kernel"], nodes["attn/out/kernel"]
    assert (q.n_in, o.n_in) == (1, 2)
    assert lorax.factor_specs(P(None, "model", None), q) == (P(None, None),
                                                            P(None, "model", None))
    assert lorax.factor_specs(P("model", None, None), o) == (P("model", None, None),
                                                            P(None, None))


def test_factor_spec_shapes_match_the_factors():
    lp = lorax.wrap({"k": jnp.ones((2, 6, 4, 5))}, rank=3, targets="k$", stacked={"k": 1},
                    in_axes=2)
    node = lp["k"]
    a_spec, b_spec = lorax.factor_specs(P("s", "x", None, "y"), node)
    assert (len(a_spec), len(b_spec)) == (node.a.ndim, node.b.ndim)
    assert (a_spec, b_spec) == (P("s", "x", None, None), P("s", None, "y"))


@pytest.mark.parametrize(
    "spec, ndim, kw, match",
    [
        (P("a", "b", "c"), 2, {}, "at most 2 entries"),
        (P(), 2, {"n_in": 2}, "n_in"),
        (P(), 3, {"n_stack": 2}, "n_stack"),
    ],
)
def test_factor_specs_errors(spec, ndim, kw, match):
    with pytest.raises(ValueError, match=match):
        lorax.factor_specs(spec, ndim, **kw)


# ----------------------------------------------------------------------------- partition_specs


def _params():
    return {
        "attn": {"query": {"kernel": jnp.ones((16, 4, 8)), "bias": jnp.zeros((4, 8))},
                 "out": {"kernel": jnp.ones((4, 8, 16))}},
        "mlp": {"kernel": jnp.ones((16, 32))},
        "head": {"kernel": jnp.ones((16, 3))},
    }


def _base_specs():
    return {
        "attn": {"query": {"kernel": P(None, "model", None), "bias": P("model", None)},
                 "out": {"kernel": P("model", None, None)}},
        "mlp": {"kernel": P("fsdp", "model")},
        "head": {"kernel": None},
    }


def test_partition_specs_of_a_wrapped_tree():
    lp = lorax.wrap(_params(), rank=2, targets=["attn", "mlp"], train="^head/")
    specs = lorax.partition_specs(lp, _base_specs())
    q, o, mlp = (specs["attn"]["query"]["kernel"], specs["attn"]["out"]["kernel"],
                 specs["mlp"]["kernel"])
    assert (q.w, q.a, q.b) == (P(None, "model", None), P(None, None), P(None, "model", None))
    assert (o.w, o.a, o.b) == (P("model", None, None), P("model", None, None), P(None, None))
    assert (mlp.a, mlp.b) == (P("fsdp", None), P(None, "model"))
    assert specs["attn"]["query"]["bias"] == P("model", None)
    assert specs["head"]["kernel"] == lorax.FullyTrained(P())  # None: replicated
    # The spec tree has the wrapped tree's structure, static fields included.
    assert jax.tree.structure(specs) == jax.tree.structure(lp)
    for node, spec in zip(_nodes(lp).values(), _nodes(specs).values(), strict=True):
        assert (spec.rank, spec.n_in, spec.path, spec.scale) == (node.rank, node.n_in,
                                                                  node.path, node.scale)


def test_partition_specs_of_dora_multi_adapter_and_quantized_nodes():
    params = {"mlp": {"kernel": jnp.ones((16, 32))}}
    base = {"mlp": {"kernel": P("fsdp", "model")}}
    dora = lorax.partition_specs(lorax.wrap(params, rank=2, dora=True), base)["mlp"]["kernel"]
    assert (dora.a, dora.b, dora.magnitude) == (P("fsdp", None), P(None, "model"), P("model"))
    plain = lorax.partition_specs(lorax.wrap(params, rank=2), base)["mlp"]["kernel"]
    assert plain.magnitude is None
    multi = lorax.add_adapter(lorax.add_adapter(params, "x", rank=2), "y", rank=4)
    specs = lorax.partition_specs(multi, base)
    assert jax.tree.structure(specs) == jax.tree.structure(multi)
    for factors in specs["mlp"]["kernel"].adapters.values():
        assert (factors.a, factors.b) == (P("fsdp", None), P(None, "model"))
    quantized = lorax.quantize(lorax.wrap(params, rank=2), "int8")
    specs = lorax.partition_specs(quantized, base)
    assert jax.tree.structure(specs) == jax.tree.structure(quantized)
    node = specs["mlp"]["kernel"]
    assert (node.w.codes, node.w.scales, node.b) == (P(), P(), P(None, "model"))


def test_partition_specs_accept_named_shardings_and_sharded_arrays():
    mesh = _one_device_mesh("model")
    params = {"kernel": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(None, "model")))}
    lp = lorax.wrap(params, rank=2)
    from_arrays = lorax.partition_specs(lp, params)
    from_shardings = lorax.partition_specs(lp, {"kernel": NamedSharding(mesh, P(None, "model"))})
    assert from_arrays == from_shardings
    assert from_arrays["kernel"].b == P(None, "model")


def test_partition_specs_errors():
    lp = lorax.wrap(_params(), rank=2)
    with pytest.raises(ValueError, match="structure of the unwrapped params"):
        lorax.partition_specs(lp, {"mlp": {"kernel": P()}})
    bad = _base_specs()
    bad["mlp"]["kernel"] = "fsdp"
    with pytest.raises(TypeError, match="mlp/kernel"):
        lorax.partition_specs(lp, bad)
    bad["mlp"]["kernel"] = P("fsdp", None, None)
    with pytest.raises(ValueError, match="at most 2 entries.*mlp/kernel"):
        lorax.partition_specs(lp, bad)


class _Boxed(nn.Module):
    """A Dense model whose kernels carry Flax partitioning metadata."""

    logical: bool

    @nn.compact
    def __call__(self, x):
        if self.logical:
            up = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            down = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        else:
            up = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            down = nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None))
        x = nn.Dense(32, kernel_init=up, name="up")(x)
        return nn.Dense(8, kernel_init=down, name="down")(x)


RULES = (("embed", None), ("mlp", "model"))


def _boxed(logical: bool):
    variables = _Boxed(logical).init(jax.random.key(0), jnp.ones((1, 8)))
    return variables, lorax.wrap(nn.unbox(variables)["params"], rank=2)


def _check_megatron(specs):
    up, down = specs["up"]["kernel"], specs["down"]["kernel"]
    assert (up.w, up.a, up.b) == (P(None, "model"), P(None, None), P(None, "model"))
    assert (down.w, down.a, down.b) == (P("model", None), P("model", None), P(None, None))
    assert specs["up"]["bias"] == P()


def test_partition_specs_from_flax_partitioned_boxes():
    variables, lp = _boxed(logical=False)
    assert isinstance(variables["params"]["up"]["kernel"], nn.Partitioned)
    _check_megatron(lorax.partition_specs(lp, variables["params"]))
    _check_megatron(lorax.partition_specs(lp, nn.get_partition_spec(variables)["params"]))


def test_partition_specs_from_flax_logical_axes():
    variables, lp = _boxed(logical=True)
    boxes = variables["params"]
    assert isinstance(boxes["up"]["kernel"], nn.LogicallyPartitioned)
    _check_megatron(lorax.partition_specs(lp, boxes, rules=RULES))
    with nn.logical_axis_rules(RULES):
        _check_megatron(lorax.partition_specs(lp, boxes))
    # nn.get_partition_spec keeps the logical names; `rules` maps them.
    _check_megatron(lorax.partition_specs(lp, nn.get_partition_spec(variables)["params"],
                                          rules=RULES))
    with pytest.raises(ValueError, match="logical-axis rules.*'down/kernel'"):
        lorax.partition_specs(lp, boxes)


def test_partition_specs_from_nnx_sharding_metadata():
    mesh = _one_device_mesh("model")
    with jax.sharding.set_mesh(mesh):
        # with_partitioning, not Linear(kernel_metadata=...): flax 0.12.0 lacks the latter.
        model = nnx.Linear(8, 16, rngs=nnx.Rngs(0), kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), (None, "model")))
    _, state = nnx.split(model)
    lp = lorax.wrap(state, rank=2)
    specs = lorax.partition_specs(lp, nnx.get_partition_spec(state))
    node = _nodes(specs)["kernel"]
    assert (node.w, node.a, node.b) == (P(None, "model"), P(None, None), P(None, "model"))


# ----------------------------------------------------------------------------- shardings, wrap


def test_shardings_feed_jit():
    mesh = _one_device_mesh("fsdp", "model")
    lp = lorax.wrap(_params(), rank=2, targets=["attn", "mlp"], train="^head/")
    shardings = lorax.shardings(lp, _base_specs(), mesh)
    assert shardings["mlp"]["kernel"].a == NamedSharding(mesh, P("fsdp", None))
    forward = lorax.lora(lambda p, x: (x @ p["mlp"]["kernel"]).sum()
                         + (x @ p["head"]["kernel"]).sum())
    step = jax.jit(jax.grad(forward), in_shardings=(shardings, None), out_shardings=shardings)
    grads = step(lp, jnp.ones((2, 16)))
    assert grads["mlp"]["kernel"].b.sharding == shardings["mlp"]["kernel"].b


def test_wrap_places_factors_of_committed_named_sharded_kernels():
    mesh = _one_device_mesh("fsdp", "model")
    base = _base_specs()
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s or P())),
                          _params(), base)
    lp = lorax.wrap(params, rank=2, targets=["attn", "mlp"])
    wanted = lorax.shardings(lp, base, mesh)
    for path, node in _nodes(lp).items():
        assert node.a.sharding == _nodes(wanted)[path].a, path
        assert node.b.sharding == _nodes(wanted)[path].b, path
    # Uncommitted (plain) kernels keep today's behaviour: default placement.
    plain = _nodes(lorax.wrap(_params(), rank=2))["mlp/kernel"]
    assert not isinstance(plain.a.sharding, NamedSharding)
    # Placement never changes the values.
    np.testing.assert_array_equal(_nodes(lp)["mlp/kernel"].a, plain.a)


def test_wrap_of_abstract_sharded_params_gives_abstract_sharded_factors():
    mesh = _one_device_mesh("fsdp", "model")
    abstract = jax.tree.map(
        lambda x, s: S(x.shape, x.dtype, sharding=NamedSharding(mesh, s or P())),
        _params(), _base_specs())
    lp = lorax.wrap(abstract, rank=2, targets=["attn", "mlp"])
    q = lp["attn"]["query"]["kernel"]
    assert isinstance(q.a, S) and q.a.sharding.spec == P(None, None)
    assert q.b.sharding.spec == P(None, "model", None)
    # Unsharded abstract params still give plain abstract factors.
    plain = lorax.wrap(jax.tree.map(lambda x: S(x.shape, x.dtype), _params()), rank=2)
    assert plain["mlp"]["kernel"].a.sharding is None


def test_wrap_under_jit_with_out_shardings():
    mesh = _one_device_mesh("fsdp", "model")
    abstract = jax.eval_shape(lambda p: lorax.wrap(p, rank=2), _params())
    out = lorax.shardings(abstract, _base_specs(), mesh)
    lp = jax.jit(lambda p: lorax.wrap(p, rank=2), out_shardings=out)(_params())
    assert lp["mlp"]["kernel"].a.sharding == out["mlp"]["kernel"].a
    np.testing.assert_array_equal(lp["mlp"]["kernel"].a,
                                  lorax.wrap(_params(), rank=2)["mlp"]["kernel"].a)


# ----------------------------------------------------------------------------- 8 devices

# Kernels whose full factor sizes (408 = 136 * 3) and long axis (136) appear nowhere else: a
# sharded factor must never exist at full size on a device.
_KERNELS = {"row": ((136, 20), P("x", None)), "col": ((20, 136), P(None, "x"))}
_RANK = 3


def _check_wrap_places_factors():
    """lorax.wrap on committed sharded W (FSDP, Megatron, stacked, multi-axis) places a and b
    on the derived shardings; every device holds only its shard; values as unsharded."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    key = jax.random.key(3)
    params = {
        "fsdp": {"kernel": jax.random.normal(key, (64, 32))},
        "col": {"kernel": jnp.ones((32, 64))},
        "row": {"kernel": jnp.ones((64, 32))},
        "attn": {"query": {"kernel": jnp.ones((32, 4, 8))}},
        "both": {"kernel": jnp.ones((16, 64))},
        "scan": {"kernel": jnp.ones((2, 32, 16))},
    }
    specs = {"fsdp": {"kernel": P(("data", "model"), None)}, "col": {"kernel": P(None, "model")},
             "row": {"kernel": P("model", None)},
             "attn": {"query": {"kernel": P("data", "model", None)}},
             "both": {"kernel": P("data", "model")}, "scan": {"kernel": P("data", "model")}}
    expected = {  # path: (a shard shape, b shard shape)
        "fsdp/kernel": ((8, 2), (2, 32)), "col/kernel": ((32, 2), (2, 16)),
        "row/kernel": ((16, 2), (2, 32)), "attn/query/kernel": ((16, 2), (2, 1, 8)),
        "both/kernel": ((8, 2), (2, 16)), "scan/kernel": ((1, 8, 2), (1, 2, 16)),
    }
    placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    kw = dict(rank=2, targets=list(params), stacked={"scan": 1})
    lp, plain = lorax.wrap(placed, **kw), lorax.wrap(params, **kw)
    wanted = _nodes(lorax.shardings(lp, specs, mesh))
    for path, node in _nodes(lp).items():
        assert node.a.sharding == wanted[path].a and node.b.sharding == wanted[path].b, path
        for factor, shape in zip((node.a, node.b), expected[path], strict=True):
            shards = factor.addressable_shards
            assert len(shards) == 8 and {s.data.shape for s in shards} == {shape}, path
        assert node.w is functools.reduce(lambda t, k: t[k], path.split("/"), placed)  # no copy
        np.testing.assert_array_equal(node.a, _nodes(plain)[path].a)
        np.testing.assert_array_equal(node.b, _nodes(plain)[path].b)


def _check_wrap_variants_place_factors():
    """DoRA magnitudes, PiSSA residual kernels and multi-adapter factors land on the shardings
    lorax.partition_specs derives."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "model"))
    spec = P("fsdp", "model")
    params = {"k": jax.device_put(jax.random.normal(jax.random.key(0), (64, 32)),
                                  NamedSharding(mesh, spec))}
    for kw in ({"dora": True}, {"init": "pissa"}):
        lp = lorax.wrap(params, rank=2, targets="k$", **kw)
        wanted = lorax.shardings(lp, {"k": spec}, mesh)
        assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, lp, wanted)), kw
    multi = lorax.add_adapter(params, "x", rank=2, targets="k$")
    wanted = lorax.shardings(multi, {"k": spec}, mesh)
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, multi, wanted))


def _full_size_arrays(hlo: str) -> list[str]:
    """HLO arrays that have a sharded factor's full size (408 elements) or its long axis."""
    found = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", hlo):
        sizes = [int(d) for d in dims.split(",") if d]
        if 136 in sizes or (sizes and int(np.prod(sizes)) == 136 * _RANK):
            found.append(f"{dtype}[{dims}]")
    return found


def _check_wrap_under_jit_out_shardings():
    """jit(init + wrap, out_shardings=lorax.shardings(...)) creates the factors already sharded:
    each device holds its shard, and the compiled program never forms a full-size factor."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    specs = {name: {"kernel": spec} for name, (_, spec) in _KERNELS.items()}

    def init_and_wrap(key):
        keys = jax.random.split(key, len(_KERNELS))
        params = {name: {"kernel": jax.random.normal(k, shape)}
                  for k, (name, (shape, _)) in zip(keys, _KERNELS.items(), strict=True)}
        return lorax.wrap(params, rank=_RANK, key=jax.random.key(1))

    abstract = jax.eval_shape(init_and_wrap, jax.random.key(0))
    out = lorax.shardings(abstract, specs, mesh)
    compiled = jax.jit(init_and_wrap, out_shardings=out).lower(jax.random.key(0)).compile()
    lp = compiled(jax.random.key(0))
    row, col = lp["row"]["kernel"], lp["col"]["kernel"]
    assert row.a.sharding.spec == P("x", None) and col.b.sharding.spec == P(None, "x")
    assert {s.data.shape for s in row.a.addressable_shards} == {(17, _RANK)}
    assert {s.data.shape for s in col.b.addressable_shards} == {(_RANK, 17)}
    assert {s.data.shape for s in row.w.addressable_shards} == {(17, 20)}
    full = _full_size_arrays(compiled.as_text())
    assert not full, f"replicated intermediates in the sharded init: {sorted(set(full))}"
    # Same factors as an eager, unsharded wrap (threefry is partitionable).
    eager = init_and_wrap(jax.random.key(0))
    for path, node in _nodes(lp).items():
        np.testing.assert_array_equal(node.a, _nodes(eager)[path].a)


def _check_restore_onto_derived_shardings():
    """Adapters saved from an FSDP-sharded tree restore onto a tensor-parallel `like` made by
    wrapping abstract, sharded params (factor shardings derived by lorax.wrap)."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    params = {"col": {"kernel": jax.random.normal(jax.random.key(0), (16, 64))}}
    fsdp = jax.device_put(params, NamedSharding(mesh, P("x", None)))
    lp = lorax.wrap(fsdp, rank=2)
    lp = jax.tree.map(lambda x: x + 1, lp)  # non-trivial factors (w too, but it is not saved)
    with tempfile.TemporaryDirectory() as directory:
        lorax.save(directory, lp)
        like = lorax.wrap(jax.tree.map(lambda x: S(x.shape, x.dtype, sharding=NamedSharding(
            mesh, P(None, "x"))), params), rank=2)
        node = lorax.restore(directory, like)["col"]["kernel"]
    assert node.a.sharding.spec == P(None, None) and node.b.sharding.spec == P(None, "x")
    np.testing.assert_array_equal(node.b, lp["col"]["kernel"].b)
    np.testing.assert_array_equal(node.a, lp["col"]["kernel"].a)


def _explicit_grads(specs: dict[str, Any], out_sharding: P | None) -> None:
    """On an Explicit-axes mesh (``jax.make_mesh``'s default from jax 0.9; Auto before, with a
    DeprecationWarning on 0.8, so it is spelled out), wrap places the factors and a LoRA
    gradient under ``jax.sharding.set_mesh`` matches the unsharded one."""
    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    params = {"up": {"kernel": jnp.ones((16, 8)) / 16}, "down": {"kernel": jnp.ones((8, 4)) / 8}}

    def forward(p, x):
        h = jnp.tanh(x @ p["up"]["kernel"])
        return jnp.matmul(h, p["down"]["kernel"], out_sharding=out_sharding)

    with jax.sharding.set_mesh(mesh):
        placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                              specs)
        lp = lorax.wrap(placed, rank=2)
        wanted = lorax.shardings(lp, specs, mesh)
        assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, lp, wanted))
        x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))
        grads = jax.jit(jax.grad(lambda p: lorax.lora(forward)(p, x).sum()))(lp)
    reference = lorax.lora(lambda p, x: jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"])
    expected = jax.grad(lambda p: reference(p, jnp.ones((8, 16))).sum())(
        lorax.wrap(params, rank=2))
    # Sharded sums round differently (1.5 eps on values ~25 seen): eps-relative.
    assert_close(lorax.split(grads)[0], lorax.split(expected)[0])


def _check_explicit_mesh_data_parallel():
    _explicit_grads({"up": {"kernel": P()}, "down": {"kernel": P()}}, None)


def _check_explicit_mesh_tensor_parallel():
    _explicit_grads({"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}},
                    P("data", None))


def _check_train_state_keeps_its_shardings():
    """A jitted train step whose out_shardings are lorax.sharding.state_shardings keeps every
    factor and every optimizer-state leaf on its intended sharding over several steps (Adam's
    moments on their factor's, the count replicated), and computes the unsharded steps."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"up": {"kernel": jax.random.normal(k1, (16, 64)) / 4, "bias": jnp.zeros(64)},
              "down": {"kernel": jax.random.normal(k2, (64, 16)) / 8}}
    specs = {"up": {"kernel": P(None, "fsdp"), "bias": P("fsdp")},
             "down": {"kernel": P("fsdp", None)}}
    tx = lorax.optimizer(optax.adamw(1e-2))
    forward = lorax.lora(lambda p, x: jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"][None])
                         @ p["down"]["kernel"])

    def step(train, frozen, opt_state, x, y):
        loss, grads = lorax.value_and_grad(lambda p: jnp.mean((forward(p, x) - y) ** 2))(
            lorax.combine(train, frozen))
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    x, y = jnp.linspace(-1.0, 1.0, 8 * 16).reshape(8, 16), jnp.ones((8, 16))
    placed = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), params, specs)
    lp = lorax.wrap(placed, rank=4)
    train_sh, state_sh = lorax.sharding.state_shardings(tx, lp, specs, mesh)
    adam = state_sh.inner_states["lorax_trainable"].inner_state[0]
    assert adam.mu == adam.nu == train_sh and adam.count.spec == P()
    assert train_sh["up"]["kernel"].b.spec == P(None, "fsdp")
    assert train_sh["down"]["kernel"].a.spec == P("fsdp", None)
    train, frozen = lorax.split(lp)
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(train)
    sharded_step = jax.jit(step, out_shardings=(train_sh, state_sh, None))
    xs, ys = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
    plain_train, plain_frozen = lorax.split(lorax.wrap(params, rank=4))
    plain_state = tx.init(plain_train)
    for _ in range(3):
        train, opt_state, _ = sharded_step(train, frozen, opt_state, xs, ys)
        plain_train, plain_state, _ = jax.jit(step)(plain_train, plain_frozen, plain_state, x, y)
    for got, want in ((train, train_sh), (opt_state, state_sh)):
        for (keypath, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                             jax.tree.leaves(want), strict=True):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
                jax.tree_util.keystr(keypath), leaf.sharding, sharding)
    assert_close(train, plain_train)
    assert_close(opt_state, plain_state)


CHECKS = {
    "wrap_places_factors": _check_wrap_places_factors,
    "wrap_variants_place_factors": _check_wrap_variants_place_factors,
    "wrap_under_jit_out_shardings": _check_wrap_under_jit_out_shardings,
    "restore_onto_derived_shardings": _check_restore_onto_derived_shardings,
    "explicit_mesh_data_parallel": _check_explicit_mesh_data_parallel,
    "explicit_mesh_tensor_parallel": _check_explicit_mesh_tensor_parallel,
    "train_state_keeps_its_shardings": _check_train_state_keeps_its_shardings,
}
def _worker(report_path: str) -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    warnings.simplefilter("error")
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for name, check in CHECKS.items():
        try:
            check()
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc(limit=8)
    Path(report_path).write_text(json.dumps(report, indent=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("sharding") / "report.json"
    proc = subprocess.run([sys.executable, __file__, str(path)], cwd=ROOT, env=cpu_devices_env(8),
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_on_8_devices(report, name):
    assert report[name] == "ok", report[name]


if __name__ == "__main__":
    _worker(sys.argv[1])

"""PEFT files, checkpoints and shardings for kernels whose axes are not (*stack, *in, *out)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, lora_nodes
from safetensors.numpy import load_file

import lorax
import lorax.checkpoint
import lorax.peft
from lorax.layouts import Layout

N, K, D, H = 4, 2, 16, 8

NAME_MAP = {
    "attn/q_einsum/w": "model.layers.0.self_attn.q_proj",
    "attn/kv_einsum/w": lorax.peft.TorchParam(("model.layers.0.self_attn.k_proj",
                                                 "model.layers.0.self_attn.v_proj")),
    "attn/attn_vec_einsum/w": "model.layers.0.self_attn.o_proj",
}


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"attn": {
        "q_einsum": {"w": jax.random.normal(keys[0], (N, D, H))},
        "kv_einsum": {"w": jax.random.normal(keys[1], (2, K, D, H))},
        "attn_vec_einsum": {"w": jax.random.normal(keys[2], (N, H, D))},
    }}


def _random_b(lp):
    def fill(node):
        if not lorax.is_lora(node):
            return node
        key = jax.random.fold_in(jax.random.key(1), len(node.path))
        return dataclasses.replace(node, b=jax.random.normal(key, node.b.shape))

    return jax.tree.map(fill, lp, is_leaf=lorax.is_lora)


def _torch_deltas(params, merged):
    """PyTorch's (out, in) weight deltas, from the merged Flax kernels (independent of the
    factors): q_proj (N*H, D), k/v_proj (K*H, D), o_proj (D, N*H)."""
    d = jax.tree.map(lambda m, w: np.asarray(m, np.float64) - np.asarray(w, np.float64),
                     merged, params)["attn"]
    q = d["q_einsum"]["w"].transpose(0, 2, 1).reshape(N * H, D)
    k = d["kv_einsum"]["w"][0].transpose(0, 2, 1).reshape(K * H, D)
    v = d["kv_einsum"]["w"][1].transpose(0, 2, 1).reshape(K * H, D)
    o = d["attn_vec_einsum"]["w"].reshape(N * H, D).T
    return {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": o}


def test_gemma_layouts_export_to_peft_projection_weights(tmp_path):
    params = _params()
    lp = _random_b(lorax.wrap(params, rank=2, alpha=4.0))
    assert [n.roles for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora)] == ["iio", "soio", "oio"]
    lorax.peft.save(tmp_path, lp, name_map=NAME_MAP)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    expected = _torch_deltas(params, lorax.merge(lp))
    prefix = "base_model.model.model.layers.0.self_attn."
    for name, delta in expected.items():
        a = tensors[f"{prefix}{name}.lora_A.weight"].astype(np.float64)
        b = tensors[f"{prefix}{name}.lora_B.weight"].astype(np.float64)
        got = scale * b @ a
        assert_close(got, delta, dtype=np.float32, ulps=32, err_msg=name)  # float32 factors


def test_gemma_layouts_round_trip(tmp_path):
    params = _params()
    lp = _random_b(lorax.wrap(params, rank=2))
    lorax.peft.save(tmp_path, lp, name_map=NAME_MAP)
    back = lorax.peft.load(tmp_path, params, name_map=NAME_MAP)
    assert [n.roles for n in lora_nodes(back)] == [n.roles for n in lora_nodes(lp)]
    chex.assert_trees_all_equal(back, lp)


def test_layout_disagreeing_with_name_map_names_the_fix(tmp_path):
    params = _params()
    lp = lorax.wrap(params, rank=2, axes={"q_einsum": "ooi"})  # not how q_proj is laid out
    with pytest.raises(ValueError, match=r"layout 'ooi'.*TorchParam\(layout='ooi'\)"):
        lorax.peft.save(tmp_path, lp, name_map=NAME_MAP)
    name_map = {**NAME_MAP, "attn/q_einsum/w": lorax.peft.TorchParam(
        "model.layers.0.self_attn.q_proj", layout="ooi")}
    lorax.peft.save(tmp_path, lp, name_map=name_map)
    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    assert back["attn"]["q_einsum"]["w"].roles == "ooi"


def test_checkpoint_records_layout_and_rejects_another(tmp_path):
    params = _params()
    lp = _random_b(lorax.wrap(params, rank=2))
    meta = lorax.checkpoint.describe(lp)["kernels"]
    assert meta["attn/q_einsum/w"]["layout"] == "oio"
    assert "layout" not in meta["attn/attn_vec_einsum/w"]  # canonical: metadata unchanged
    lorax.save(tmp_path, lp)
    back = lorax.restore(tmp_path, lorax.wrap(params, rank=2))
    np.testing.assert_array_equal(back["attn"]["q_einsum"]["w"].b, lp["attn"]["q_einsum"]["w"].b)
    other = lorax.wrap(params, rank=2, axes={"q_einsum": "ioo"})
    with pytest.raises(lorax.CheckpointMismatchError, match="q_einsum/w"):
        lorax.restore(tmp_path, other)


def test_factor_shardings_follow_the_layout():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("heads",))
    spec = jax.sharding.PartitionSpec("heads", None, None)  # q_einsum sharded over heads N
    w = jax.ShapeDtypeStruct((N, D, H), jnp.float32,
                             sharding=jax.sharding.NamedSharding(mesh, spec))
    node = lorax.wrap({"q_einsum": {"w": w}}, rank=2)["q_einsum"]["w"]
    # a: (D, r) replicated; b: (r, N, H) keeps N's mesh axis.
    assert node.a.sharding.spec == jax.sharding.PartitionSpec(None, None)
    assert node.b.sharding.spec == jax.sharding.PartitionSpec(None, "heads", None)
    specs = lorax.partition_specs({"q_einsum": {"w": node}}, {"q_einsum": {"w": spec}})
    assert specs["q_einsum"]["w"].b == jax.sharding.PartitionSpec(None, "heads", None)


# ----------------------------------------------------------------------------- Layout

ROLES = ["io", "oi", "iio", "oio", "sio", "soio", "isoo", "oiso", "ssoio", "osi"]


@pytest.mark.parametrize("roles", ROLES)
def test_layout_algebra_matches_numpy(roles):
    lay = Layout(roles)
    shape = (2, 3, 5, 7, 11)[:len(roles)]  # distinct sizes: every axis is recognisable
    rank = ["sio".index(c) for c in roles]
    order = tuple(int(j) for j in np.argsort(rank, kind="stable"))
    assert lay.order == order
    assert lay.inverse == tuple(int(j) for j in np.argsort(order))
    x = np.arange(np.prod(shape)).reshape(shape)
    assert np.transpose(x, lay.order).shape == lay.to_canonical(shape)
    np.testing.assert_array_equal(np.transpose(np.transpose(x, lay.order), lay.inverse), x)
    want = tuple(tuple(n for n, c in zip(shape, roles, strict=True) if c == g) for g in "sio")
    assert lay.groups(lay.to_canonical(shape)) == want
    assert tuple(map(len, want)) == (lay.n_stack, lay.n_in, lay.n_out)
    assert [*lay.stack, *lay.ins, *lay.outs] == list(range(len(roles)))
    canonical = "".join(sorted(roles, key="sio".index))
    assert lay.is_canonical == (roles == canonical)
    assert lay.stored == (None if roles == canonical else roles)
    assert Layout.canonical(lay.ndim, lay.n_stack, lay.n_in) == Layout(canonical)
    assert lay.node_fields == {"n_stack": lay.n_stack, "n_in": lay.n_in, "layout": lay.stored}
    stack_axes = tuple(j for j, c in enumerate(roles) if c == "s")
    assert lay.without(stack_axes) == Layout(roles.replace("s", ""))
    assert len({lay, Layout(roles)}) == 1  # hashable, equal by roles


@pytest.mark.parametrize("roles", ["", "ii", "oo", "sss", "iox", "i o", 3, None])
def test_layout_rejects_roles_without_an_input_and_an_output(roles):
    with pytest.raises(ValueError, match=r"'s' \(stack\), 'i' \(input\) or 'o' \(output\)"):
        Layout(roles)


def test_node_axes_layout_agrees_with_its_arrays():
    for node in lora_nodes(lorax.wrap(_params(), rank=2)):
        lay = node.axes_layout
        assert lay == Layout(node.roles) and lay.stored == node.layout
        assert np.transpose(np.asarray(node.w), lay.order).shape == node.canonical_shape
        stack, ins, outs = node.groups(node.shape)
        assert (node.a.shape, node.b.shape) == ((*stack, *ins, 2), (*stack, 2, *outs))


def test_adapted_norm_takes_a_layout_or_the_counts():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)  # canonical: stack 3, in (4, 5)
    a, b = rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 2, 6))
    a, b = a.astype(np.float32), b.astype(np.float32)
    v = w + 0.5 * np.einsum("sijr,sro->sijo", a, b)
    want = np.sqrt((v.astype(np.float64) ** 2).sum((1, 2)))
    for args in ((Layout("isio"),), (1, 2)):  # w is canonical: (*stack, *in, *out)
        assert_close(lorax.dora.adapted_norm(w, a, b, 0.5, *args), want)

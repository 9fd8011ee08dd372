"""The traps a new user falls into: each is refused early with a message that names the fix."""

import logging
import os
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx
from helpers import assert_close

import lorax
import lorax.peft
import lorax.summaries


@pytest.fixture
def dense():
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    return model, params


def test_node_used_as_array_names_lora(dense):
    model, params = dense
    lp = lorax.wrap(params, rank=2)
    with pytest.raises(TypeError, match=r"lorax\.lora.*'kernel'|'kernel'.*lorax\.lora"):
        model.apply({"params": lp}, jnp.ones((1, 8)))
    # The transformed function is the fix the message names.
    y = lorax.lora(model.apply)({"params": lp}, jnp.ones((1, 8)))
    assert y.shape == (1, 4)


def test_save_refuses_a_tree_without_adapters(tmp_path, dense):
    _, params = dense
    lp = lorax.wrap(params, rank=2)
    assert lorax.save(tmp_path, lp) == 0
    with pytest.raises(ValueError, match="without any.*lorax.merge"):
        lorax.save(tmp_path, lorax.merge(lp))
    with pytest.raises(TypeError, match="`tree`.*object"):
        lorax.save(tmp_path, object())
    with lorax.CheckpointManager(tmp_path) as manager, pytest.raises(ValueError, match="adapters"):
        manager.save(5, params)
    # The last good step is still the latest, and restores.
    restored = lorax.restore(tmp_path, lp)
    assert restored["kernel"].rank == 2


def test_restore_of_a_missing_directory_creates_nothing(tmp_path, dense):
    _, params = dense
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="`directory`.*missing"):
        lorax.restore(missing, lorax.wrap(params, rank=2))
    assert not os.path.exists(missing)


def test_raw_dict_default_targets_explains_the_default():
    params = {"w1": jnp.ones((4, 4)), "w2": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="named `kernel`.*`targets=`.*'w1'"):
        lorax.wrap(params)
    assert lorax.is_lora(lorax.wrap(params, rank=2, targets="w1$")["w1"])


def test_optimizer_factory_not_called():
    with pytest.raises(TypeError, match=r"`tx`.*call it: `adam\(learning_rate\)`"):
        lorax.optimizer(optax.adam)


@pytest.mark.parametrize("call", [
    lambda: lorax.lora(42),
    lambda: lorax.merge(object()),
    lambda: lorax.split(object()),
    lambda: lorax.trainable(object()),
])
def test_wrong_types_rejected_at_the_call(call):
    with pytest.raises(TypeError, match="expected `(fn|tree)`"):
        call()


def test_path_named_in_tree_type_error():
    with pytest.raises(TypeError, match="'layer/kernel'"):
        lorax.merge({"layer": {"kernel": object()}})


def test_structure_functions_accept_trees_of_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    assert lorax.trainable({"kernel": spec}) == {"kernel": False}


# --- round 2 (issue 21): each was hit by a new user following the README -------------------


def _ckpt_setup():
    params = {"fc": {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)}}
    lp = lorax.wrap(params, rank=2)
    tx = lorax.optimizer(optax.adamw(1e-2))
    train, frozen = lorax.split(lp)
    grads = jax.tree.map(jnp.ones_like, train)
    _, opt_state = tx.update(grads, tx.init(train), train)  # non-zero moments
    return lp, tx, train, opt_state


def test_restore_refuses_an_opt_state_of_another_structure(tmp_path):
    lp, tx, train, opt_state = _ckpt_setup()
    with lorax.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, lp, opt_state=opt_state)
    with lorax.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(lorax.CheckpointMismatchError,
                           match=r"`opt_state`.*'.*mu/fc/kernel/w': saved None, given MaskedNode"
                                 r".*opt_state=tx\.init\(lorax\.split\(like\)\[0\]\)"):
            mgr.restore(lp, opt_state=tx.init(lp))
        restored = mgr.restore(lp, opt_state=tx.init(train))
    chex.assert_trees_all_equal(restored.opt_state, opt_state)
    # The restored state fits the trainable half: the next update runs.
    tx.update(jax.tree.map(jnp.ones_like, train), restored.opt_state, train)


def test_successful_restores_log_no_warning(tmp_path, caplog):
    lp, tx, train, opt_state = _ckpt_setup()
    with lorax.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, lp, opt_state=opt_state, extra={"x": jnp.ones(2)}, data={"epoch": 3})
    with caplog.at_level(logging.INFO):
        with lorax.CheckpointManager(tmp_path) as mgr:
            assert mgr.restore(lp, opt_state=tx.init(train)).data == {"epoch": 3}
            assert mgr.restore(lp).step == 1  # a subset of the saved items
        lorax.restore(tmp_path, lp)
        lorax.restore(tmp_path, lorax.unwrap(lp))  # plain params: the metadata wraps them
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


def test_peft_save_refuses_two_leaves_on_one_parameter(tmp_path):
    p = {"fc": {"kernel": jnp.ones((16, 8))},
         "head": {"kernel": jnp.full((8, 1), 2.0), "bias": jnp.full((1,), 3.0)}}
    lp = lorax.wrap(p, rank=4, targets="fc", train="head")
    with pytest.raises(ValueError, match=r"both 'head/bias' and 'head/kernel' .*'score\.weight'"):
        lorax.peft.save(tmp_path, lp, name_map={"fc/kernel": "fc", "head/kernel": "score",
                                                "head/bias": "score"})
    assert not os.listdir(tmp_path)  # nothing written
    both = {"fc/kernel": "fc", "head/kernel": "score",
            "head/bias": lorax.peft.TorchParam("score", "bias")}
    lorax.peft.save(tmp_path, lp, name_map=both)
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["base_model.model.score.bias"], [3.0])
    np.testing.assert_array_equal(tensors["base_model.model.score.weight"], np.full((1, 8), 2.0))


def _adapted(tree):
    return sorted(n.path for n in jax.tree.leaves(tree, is_leaf=lorax.is_lora)
                  if lorax.is_lora(n))


def test_list_targets_name_whole_path_components():
    k, e = jnp.ones((4, 4)), jnp.ones((8, 4))
    t5 = {"q": {"kernel": k}, "v": {"kernel": k}, "relative_attention_bias": {"embedding": e}}
    assert _adapted(lorax.wrap(t5, rank=2, targets=["q", "v"])) == ["q/kernel", "v/kernel"]
    # A string stays a regex searched in the path.
    assert len(_adapted(lorax.wrap(t5, rank=2, targets="q|v"))) == 3
    layers = {f"layers_{i}": {"kernel": k} for i in (1, 10)}
    assert _adapted(lorax.wrap(layers, rank=2, targets=["layers_1"])) == ["layers_1/kernel"]
    # Entries with regex syntax are regexes; a multi-component name matches at boundaries.
    assert len(_adapted(lorax.wrap(layers, rank=2, targets=["layers_1.*"]))) == 2
    nested = {"attn": {"query": {"kernel": k}}, "xattn": {"query": {"kernel": k}}}
    assert _adapted(lorax.wrap(nested, rank=2, targets=["attn/query"])) == ["attn/query/kernel"]
    with pytest.raises(ValueError, match=r"'layers'.*whole path components.*'layers_1'"):
        lorax.wrap(layers, rank=2, targets=["layers"])


def test_default_targets_accept_a_small_head_and_exclude_agrees_with_train():
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(1)])
    x = jnp.linspace(-1.0, 1.0, 64).reshape(4, 16)
    params = model.init(jax.random.key(0), x)["params"]
    lp = lorax.wrap(params, rank=4)  # Dense(1): rank 4 > min(32, 1), as PEFT allows
    head = lp["layers_2"]["kernel"]
    assert (head.a.shape, head.b.shape) == ((32, 4), (4, 1))
    assert_close(lorax.lora(model.apply)({"params": lp}, x), model.apply({"params": params}, x))
    lp = lorax.wrap(params, rank=4, exclude="layers_2", train="layers_2")
    assert _adapted(lp) == ["layers_0/kernel"]
    assert lorax.summary(lp).fully_trained == ("layers_2/bias", "layers_2/kernel")


def test_nnx_model_on_a_wrapped_state_names_lora():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    lp = lorax.wrap(state, rank=2)
    x = jnp.ones((1, 4))
    with pytest.raises(TypeError, match=r"'kernel'.*lorax\.lora.*nnx\.merge"):
        nnx.merge(graphdef, lp)(x)
    (node,) = [n for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    for use in (lambda n: n[0], lambda n: x @ n, lambda n: n * 2.0, lambda n: n + 1.0):
        with pytest.raises(TypeError, match=r"lorax\.lora"):
            use(node)
    with pytest.raises(AttributeError, match=r"lorax\.lora"):
        node.T  # noqa: B018
    y = lorax.lora(lambda s, x: nnx.merge(graphdef, s)(x))(lp, x)
    assert_close(y, model(x))


def test_the_trainable_half_where_the_whole_tree_belongs(tmp_path):
    lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
    train, frozen = lorax.split(lp)
    loss = lorax.lora(lambda p: jnp.sum(jnp.ones((1, 4)) @ p["kernel"]))
    fix = r"got the trainable half of lorax\.split \(W is None at 'kernel'\).*lorax\.combine"
    with pytest.raises(ValueError, match="argument 0 .*" + fix):
        lorax.value_and_grad(loss)(train)
    with pytest.raises(ValueError, match="`tree` .*" + fix):
        lorax.save(tmp_path, train)
    with pytest.raises(ValueError, match=r"frozen half .*A is None"):
        lorax.save(tmp_path, frozen)
    assert lorax.save(tmp_path, lorax.combine(train, frozen)) == 0


def test_peft_export_of_a_stacked_kernel_takes_a_tuple(tmp_path):
    w = jnp.linspace(-1.0, 1.0, 3 * 8 * 16).reshape(3, 8, 16)
    lp = lorax.wrap({"blocks": {"up": {"kernel": w}}}, rank=2, axes={"up/kernel": "sio"})
    with pytest.raises(NotImplementedError, match=r"stacked over axes \[0\] \(stack shape \[3\]\)"):
        lorax.peft.save(tmp_path, lp, name_map={"blocks/up/kernel": "up_proj"})
    modules = tuple(f"layers.{i}.mlp.up_proj" for i in range(3))
    name_map = {"blocks/up/kernel": modules}
    lorax.peft.save(tmp_path, lp, name_map=name_map)
    back = lorax.peft.load(tmp_path, {"blocks": {"up": {"kernel": w}}}, name_map=name_map)
    chex.assert_trees_all_equal(back["blocks"]["up"]["kernel"].a, lp["blocks"]["up"]["kernel"].a)


def test_documented_training_keeps_w_and_plain_optax_is_not_documented():
    # The README's pattern (lorax.optimizer(adamw) on the trainable half) leaves W bit-identical;
    # the README no longer calls whole-tree jax.grad "also works".
    params = {"kernel": jnp.ones((4, 4))}
    lp = lorax.wrap(params, rank=2)
    loss = lorax.lora(lambda p: jnp.sum((jnp.ones((1, 4)) @ p["kernel"]) ** 2))
    tx = lorax.optimizer(optax.adamw(1e-2))
    train, frozen = lorax.split(lp)
    state = tx.init(train)
    for _ in range(3):
        _, g = lorax.value_and_grad(loss)(lorax.combine(train, frozen))
        updates, state = tx.update(g, state, train)
        train = optax.apply_updates(train, updates)
    assert lorax.combine(train, frozen)["kernel"].w is params["kernel"]
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert "also works" not in readme and "Never\napply a plain optax transform" in readme


def test_adapter_ids_accept_names():
    k = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    mp = lorax.add_adapter({"kernel": k}, "zeta", rank=2, init="gaussian")
    mp = lorax.add_adapter(mp, "alpha", rank=2, init="gaussian", key=jax.random.key(1))
    mp = jax.tree.map(lambda b: b + 0.5, mp)  # non-zero b (and W + 0.5) for both adapters
    f = lorax.lora(lambda p, x: x @ p["kernel"])
    x = jnp.ones((3, 4))
    by_name = f(mp, x, adapter_ids=["zeta", "alpha", None])
    by_index = f(mp, x, adapter_ids=jnp.array([1, 0, -1]))  # sorted: alpha 0, zeta 1
    chex.assert_trees_all_equal(by_name, by_index)
    assert not np.allclose(by_name[0], by_name[1])
    with pytest.raises(ValueError, match=r"name adapters of the tree \['alpha', 'zeta'\], got 'x'"):
        f(mp, x, adapter_ids=["zeta", "x", None])
    with pytest.raises(ValueError, match=r"sorted names \['alpha', 'zeta'\]"):
        f(mp, x, adapter_ids=jnp.ones(3))


def test_summary_rows_for_variants_and_train_leaves():
    params = {"fc": {"kernel": jnp.ones((16, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
    s = lorax.summary(lorax.quantize(lorax.wrap(params, rank=2, targets="fc", train="head",
                                                dora=True), "int8", block_size=8))
    assert isinstance(s, lorax.summaries.Summary)
    assert s.adapted[0].kind == "dora, int8 base"
    assert s.trained == (lorax.summaries.TrainedLeaf("head/kernel", (8, 2), 16),)
    assert "head/kernel  8x2" in str(s) and "dora, int8 base" in str(s)

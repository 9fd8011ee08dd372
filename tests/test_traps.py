"""The traps a new user falls into: each is refused early with a message that names the fix."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax


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

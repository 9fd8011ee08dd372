"""`lorax.LoRAConfig`: one validated settings object, equivalent to wrap's keywords."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

import lorax


def _params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {"q": {"kernel": jax.random.normal(keys[0], (16, 8))},
            "mlp": {"kernel": jax.random.normal(keys[1], (8, 16)), "bias": jnp.zeros(16)}}


def test_config_equals_the_keywords():
    settings = dict(rank=4, targets=["q", "mlp"], alpha=6.0, rank_pattern={"mlp": 2},
                    train="bias", rslora=True, dropout=0.1, key=jax.random.key(3), dora=True)
    by_keywords = lorax.wrap(_params(), **settings)
    by_config = lorax.wrap(_params(), config=lorax.LoRAConfig(**settings))
    assert jax.tree.structure(by_config) == jax.tree.structure(by_keywords)  # static fields
    chex.assert_trees_all_equal(by_config, by_keywords)
    node = by_config["mlp"]["kernel"]
    assert (node.rank, node.scale) == (2, 6.0 / 2**0.5)


def test_replace_gives_a_validated_variant():
    cfg = lorax.LoRAConfig(rank=4)
    assert lorax.wrap(_params(), config=dataclasses.replace(cfg, rank=2))["q"]["kernel"].rank == 2
    with pytest.raises(ValueError, match="expected `rank` to be an int >= 1, got 0"):
        dataclasses.replace(cfg, rank=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3


@pytest.mark.parametrize("field, value, error, message", [
    ("alpha", -1.0, ValueError, "`alpha` to be a positive finite number"),
    ("init", "xavier", ValueError, "`init` to be one of"),
    ("dropout", 1.0, ValueError, r"`dropout` to be a float in \[0, 1\)"),
    ("rslora", "yes", TypeError, "`rslora` to be a bool"),
    ("dora", 1, TypeError, "`dora` to be a bool"),
    ("key", 3, TypeError, "`key` to be a PRNG key"),
    ("dtype", jnp.int8, TypeError, "`dtype` to be a floating dtype"),
    ("rank_pattern", [("q", 2)], TypeError, r"`rank_pattern` to be a dict \{regex: value\}"),
    ("targets", "(", ValueError, "targets"),
])
def test_each_bad_field_is_named(field, value, error, message):
    with pytest.raises(error, match=message):
        lorax.LoRAConfig(**{field: value})


def test_config_and_keywords_together_are_refused():
    cfg = lorax.LoRAConfig(rank=4)
    with pytest.raises(TypeError, match="got `config` and `alpha`.*dataclasses.replace"):
        lorax.wrap(_params(), alpha=2.0, config=cfg)
    with pytest.raises(TypeError, match="expected `config` to be a lorax.LoRAConfig, got dict"):
        lorax.wrap(_params(), config={"rank": 4})

"""Jitted LoRA train steps trace (and so compile) once, then run on new values.

Each case runs ``N_STEPS`` steps of ``lorax.value_and_grad`` + ``lorax.optimizer(adam)`` on new
batches under ``chex.assert_max_traces(n=1)``: a second trace (a weak type, dtype, shape,
sharding or pytree that drifts between steps) fails the step that causes it. Each case also
checks that the steps do something: every trainable leaf moves and the loss on a held-out
batch falls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorax

N_STEPS = 4
BATCH, D_IN, D_HID, D_OUT = 16, 64, 128, 32  # kernels: whole 64-value NF4 blocks


@pytest.fixture(autouse=True)
def _trace_counter():
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"up": {"kernel": jnp.asarray(rng.standard_normal((D_IN, D_HID)) / 8, jnp.float32),
                   "bias": jnp.zeros(D_HID, jnp.float32)},
            "down": {"kernel": jnp.asarray(rng.standard_normal((D_HID, D_OUT)) / 11, jnp.float32)}}


def _mlp(p: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"][None])
    return h @ p["down"]["kernel"]


_TARGET = np.random.default_rng(1).standard_normal((D_IN, D_OUT)) / 8


def _batch(seed: int) -> dict[str, jax.Array]:
    """New inputs, and targets a linear map the adapters can move towards."""
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((BATCH, D_IN))
    ids = rng.permutation(np.arange(BATCH) % 3 - 1)  # routed cases: adapters 0, 1 and none
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(x @ _TARGET, jnp.float32),
            "ids": jnp.asarray(ids, jnp.int32)}


def _loss(tree: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.mean((lorax.lora(_mlp)(tree, batch["x"]) - batch["y"]) ** 2)


def _routed_loss(tree: Any, batch: dict[str, jax.Array]) -> jax.Array:
    y = lorax.lora(_mlp)(tree, batch["x"], adapter_ids=batch["ids"])
    return jnp.mean((y - batch["y"]) ** 2)


def _train(lp: Any, loss: Callable[..., jax.Array], *, mesh: Mesh | None = None,
           place: Callable[[Any], Any] = lambda b: b) -> tuple[Any, Any]:
    """``N_STEPS`` jitted steps from ``lp`` on new batches (each passed through ``place``);
    returns the initial trainable half and the trained tree.

    With a ``mesh``, the step keeps every array where ``lp`` placed it (in and out shardings),
    batch rows are split over the mesh and scalars replicated; the initial optimizer state is
    placed the same way (optax creates Adam's step count unplaced, which would retrace the
    second step: its type gains the mesh)."""
    tx = lorax.optimizer(optax.adam(3e-2))
    train, frozen = lorax.split(lp)
    opt_state = tx.init(train)
    jit_kw = {}
    if mesh is not None:
        rows, replicated = NamedSharding(mesh, P("model")), NamedSharding(mesh, P())

        def placed(tree):
            return jax.tree.map(lambda x: x.sharding if x.ndim else replicated, tree)

        opt_state = jax.device_put(opt_state, placed(opt_state))
        jit_kw = {"in_shardings": (placed(train), placed(frozen), placed(opt_state), rows),
                  "out_shardings": (placed(train), placed(opt_state), replicated)}
        place = functools.partial(jax.device_put, device=rows)

    @chex.assert_max_traces(n=1)
    def step(train, frozen, opt_state, batch):
        value, grads = lorax.value_and_grad(loss)(lorax.combine(train, frozen), batch)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, value

    jitted = jax.jit(step, **jit_kw)
    initial = train
    for i in range(N_STEPS):
        train, opt_state, value = jitted(train, frozen, opt_state, place(_batch(i)))
        assert np.isfinite(float(value))
    return initial, lorax.combine(train, frozen)


def _assert_trained(lp: Any, initial: Any, trained: Any, loss: Callable[..., jax.Array]):
    """Every trainable leaf moved, and the loss on an unseen batch fell."""
    final = lorax.split(trained)[0]
    chex.assert_trees_all_equal_shapes_and_dtypes(final, initial)
    chex.assert_tree_all_finite(final)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), final, initial)
    assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved)), moved
    held_out = _batch(N_STEPS)
    assert float(loss(trained, held_out)) < float(loss(lp, held_out))


@pytest.mark.parametrize("variant", ["lora", "dora", "nf4", "int8_dora"])
def test_step_compiles_once(variant):
    wrap_kw = {"dora": variant.endswith("dora")}
    lp = lorax.wrap(_params(), rank=4, key=jax.random.key(0), **wrap_kw)
    if variant in ("nf4", "int8_dora"):
        lp = lorax.quantize(lp, variant.split("_")[0])
        assert all(isinstance(n.w, lorax.QuantizedArray)
                   for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n))
    initial, trained = _train(lp, _loss)
    _assert_trained(lp, initial, trained, _loss)


def test_routed_step_compiles_once():
    lp = lorax.add_adapter(_params(), "a", rank=2, key=jax.random.key(0))
    lp = lorax.add_adapter(lp, "b", rank=3, key=jax.random.key(1))
    initial, trained = _train(lp, _routed_loss)
    _assert_trained(lp, initial, trained, _routed_loss)


def test_sharded_step_compiles_once():
    """Column-parallel ``up``, row-parallel ``down``, batch rows over the same mesh axis (one
    device in the ordinary test process; any number that divides the sizes)."""
    mesh = Mesh(np.array(jax.devices()), ("model",))
    specs = {"up": {"kernel": P(None, "model"), "bias": P("model")},
             "down": {"kernel": P("model", None)}}
    params = jax.device_put(_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    lp = lorax.wrap(params, rank=4, key=jax.random.key(0))
    wanted = lorax.shardings(lp, specs, mesh)
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, lp, wanted))
    initial, trained = _train(lp, _loss, mesh=mesh)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, trained), wanted)
    _assert_trained(lp, initial, trained, _loss)


def test_a_retrace_fails():
    """The guard has teeth: a batch of another shape retraces the step, which fails."""
    lp = lorax.wrap(_params(), rank=4, key=jax.random.key(0))

    sizes = iter(range(BATCH, 0, -1))

    def shrink(batch):
        n = next(sizes)
        return {k: v[:n] for k, v in batch.items()}

    with pytest.raises(AssertionError, match="trace"):
        _train(lp, _loss, place=shrink)

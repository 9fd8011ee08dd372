"""`lorax.wrap(module)`: an NNX module trained with NNX's own tools, against the functional path.

The model is a small transformer with every NNX part the issue names: Embed, Linear,
MultiHeadAttention, LayerNorm, Dropout, BatchNorm (batch statistics), and a stack of blocks made
with ``nnx.vmap`` and run with ``nnx.scan`` (optionally under ``nnx.remat``), or as a Python loop
over an ``nnx.List`` (so XLA's cost analysis sees every layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorax

from tests.helpers import assert_close

D, VOCAB, LAYERS, RANK = 16, 32, 2, 4


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, D, D, decode=False, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.bn = nnx.BatchNorm(2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln(x)
        x = x + self.drop(self.attn(h, mask=nnx.make_causal_mask(h[..., 0])))
        return x + self.down(nnx.relu(self.bn(self.up(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, scan: bool = True, remat: bool = False):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.scan, self.remat = scan, remat
        if scan:
            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs: nnx.Rngs) -> Block:
                return Block(rngs)

            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        if self.scan:
            def body(x, block):
                return block(x)

            if self.remat:
                body = nnx.remat(body)
            x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(x)


def loss_fn(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


TOKENS = jax.random.randint(jax.random.key(1), (4, 9), 0, VOCAB)


def _base(**kwargs) -> Transformer:
    return Transformer(nnx.Rngs(0), **kwargs)


def _kernels(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def _factors(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.LoRAParam)
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@nnx.jit
def _train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model, tokens)
    optimizer.update(model, grads)
    return loss


def test_wrap_is_pure_and_places_lora_params_beside_each_kernel():
    base = _base()
    before = _kernels(base)
    model = lorax.wrap(base, rank=RANK)
    assert not jax.tree.leaves(nnx.state(base, nnx.LoRAParam))  # the original is untouched
    assert type(base.head) is nnx.Linear and type(base) is Transformer
    factors = _factors(model)
    # every Linear of the stacked blocks (q, k, v, out, up, down) and the head; not the embedding
    owners = {k.rsplit("/", 1)[0] for k in factors}
    assert owners == {"blocks/attn/query", "blocks/attn/key", "blocks/attn/value",
                      "blocks/attn/out", "blocks/up", "blocks/down", "head"}
    assert factors["blocks/up/kernel_lora_a"].shape == (LAYERS, D, RANK)  # a stack: per layer
    assert factors["blocks/up/kernel_lora_b"].shape == (LAYERS, RANK, 2 * D)
    assert factors["head/kernel_lora_a"].shape == (D, RANK)
    assert not factors["head/kernel_lora_b"].any()
    assert isinstance(model.head, nnx.Linear) and type(model.head) is not nnx.Linear
    kernels = _kernels(model)
    assert kernels.keys() == before.keys()
    assert all((kernels[k] == before[k]).all() for k in before)


@pytest.mark.parametrize("scan", [True, False])
def test_step0_equals_base_and_a_trained_adapter_equals_dense_math(scan):
    base = _base(scan=scan)
    model = lorax.wrap(base, rank=RANK)
    base.eval()
    model.eval()
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))
    # with b != 0, the module computes W + s·A·B: the base module with merged kernels, computed
    # independently with dense math here
    b = model.head.kernel_lora_b
    b.set_value(jax.random.normal(jax.random.key(2), b.get_value().shape))
    dense = nnx.clone(base)
    head = model.head
    delta = head.kernel_lora_a.get_value() @ b.get_value() * (8.0 / RANK)
    dense.head.kernel.set_value(base.head.kernel.get_value() + delta)
    assert_close(model(TOKENS), dense(TOKENS), ulps=256)  # a whole model's rounding


def _functional_steps(base: nnx.Module, steps: int):
    """The same training through the functional path: lorax.wrap of the Param state,
    lorax.lora of nnx.merge, lorax.value_and_grad, lorax.optimizer."""
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    lp = lorax.wrap(params, rank=RANK)
    tx = lorax.optimizer(optax.adam(1e-2))
    train, frozen = lorax.split(lp)
    opt_state = tx.init(train)

    @lorax.lora
    def forward(lp, rest, tokens):
        model = nnx.merge(graphdef, lp, rest)
        return loss_fn(model, tokens), nnx.state(model, nnx.Not(nnx.Param))

    @jax.jit
    def step(train, rest, opt_state):
        (loss, rest), grads = lorax.value_and_grad(forward, has_aux=True)(
            lorax.combine(train, frozen), rest, TOKENS)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), rest, opt_state, loss

    losses = []
    for _ in range(steps):
        train, rest, opt_state, loss = step(train, rest, opt_state)
        losses.append(float(loss))
    return lorax.combine(train, frozen), rest, losses


@pytest.mark.parametrize("remat", [False, True])
def test_three_adam_steps_under_nnx_jit_match_the_functional_path(remat):
    base = _base(remat=remat)
    before = _kernels(base)
    model = lorax.wrap(base, rank=RANK)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    losses = [float(_train_step(model, optimizer, TOKENS)) for _ in range(3)]
    assert losses[2] < losses[0]
    after = _kernels(model)
    assert all((after[k] == before[k]).all() for k in before)  # every W bit-identical
    # no optimizer state for W: Adam's mu and nu are factor-sized
    opt_sizes = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
    factor_sizes = sum(x.size for x in _factors(model).values())
    assert opt_sizes == 2 * factor_sizes + 1  # + Adam's count

    tree, rest, ref_losses = _functional_steps(_base(remat=remat), 3)
    assert_close(np.float32(losses), np.float32(ref_losses), ulps=64)
    mine = lorax.modules.module_tree(model)
    for (path, node), (_, ref) in zip(
            jax.tree_util.tree_flatten_with_path(mine, is_leaf=lorax.is_lora)[0],
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lora)[0], strict=True):
        if lorax.is_lora(ref):
            assert_close((node.a, node.b), (ref.a, ref.b), ulps=1024,
                         err_msg=jax.tree_util.keystr(path))
    # batch statistics and dropout RNG counters moved as on the functional path
    stats = nnx.state(model, nnx.BatchStat)
    ref_stats = nnx.state(nnx.merge(*nnx.split(_base(remat=remat), nnx.Param, ...)[:1],
                                    nnx.state(_base(remat=remat), nnx.Param), rest),
                          nnx.BatchStat)
    assert_close(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), ulps=1024)


def test_merge_gives_the_base_classes_and_the_same_function():
    base = _base()
    model = lorax.wrap(base, rank=RANK)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    for _ in range(2):
        _train_step(model, optimizer, TOKENS)
    merged = lorax.merge(model)
    assert type(merged.head) is nnx.Linear and type(merged.blocks.up) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    model.eval()
    merged.eval()
    assert_close(merged(TOKENS), model(TOKENS), ulps=256)
    unwrapped = lorax.unwrap(model)
    base.eval()
    np.testing.assert_array_equal(unwrapped(TOKENS), base(TOKENS))

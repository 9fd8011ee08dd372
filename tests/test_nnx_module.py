"""`lorax.wrap(module)`: an NNX module trained with NNX's own tools, against the functional path.

The model is :mod:`experiments.nnx_transformer`, a small transformer with every NNX part the
issue names: Embed, Linear, MultiHeadAttention, LayerNorm, Dropout, BatchNorm (batch
statistics), and a stack of blocks made with ``nnx.vmap`` and run with ``nnx.scan``
(optionally under ``nnx.remat``, or unrolled so XLA's cost analysis sees every layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorax
from experiments import nnx_transformer as nt
from tests.helpers import assert_close

RANK = 4
CONFIG = nt.TransformerConfig()  # vocab 64, d 32, 2 layers


def loss_fn(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    return nt.loss_fn(model, tokens)


TOKENS = jax.random.randint(jax.random.key(1), (4, 9), 0, CONFIG.vocab_size)


def _base(*, unroll: bool = False, remat: bool = False, d: int = CONFIG.d_model,
          max_len: int = CONFIG.max_len) -> nnx.Module:
    config = dataclasses.replace(CONFIG, unroll=unroll, remat=remat, d_model=d, max_len=max_len)
    return nt.Transformer(config, rngs=nnx.Rngs(0))


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
    assert type(base.head) is nnx.Linear and type(base) is nt.Transformer
    factors = _factors(model)
    # every Linear of the stacked blocks (q, k, v, out, up, down) and the head; not the embedding
    owners = {k.rsplit("/", 1)[0] for k in factors}
    assert owners == {"blocks/attn/query", "blocks/attn/key", "blocks/attn/value",
                      "blocks/attn/out", "blocks/mlp_in", "blocks/mlp_out", "head"}
    layers, d, d_ff = CONFIG.n_layers, CONFIG.d_model, CONFIG.d_ff
    assert factors["blocks/mlp_in/kernel_lora_a"].shape == (layers, d, RANK)  # one per layer
    assert factors["blocks/mlp_in/kernel_lora_b"].shape == (layers, RANK, d_ff)
    assert factors["head/kernel_lora_a"].shape == (d, RANK)
    assert not factors["head/kernel_lora_b"].any()
    assert isinstance(model.head, nnx.Linear) and type(model.head) is not nnx.Linear
    kernels = _kernels(model)
    assert kernels.keys() == before.keys()
    assert all((kernels[k] == before[k]).all() for k in before)


@pytest.mark.parametrize("unroll", [False, True])
def test_step0_equals_base_and_a_trained_adapter_equals_dense_math(unroll):
    base = _base(unroll=unroll)
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
    assert opt_sizes == 2 * factor_sizes + 2  # + Adam's count and the optimizer's step

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
    assert type(merged.head) is nnx.Linear and type(merged.blocks.mlp_in) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    model.eval()
    merged.eval()
    assert_close(merged(TOKENS), model(TOKENS), ulps=256)
    unwrapped = lorax.unwrap(model)  # the base kernels back (batch statistics as trained)
    assert type(unwrapped.blocks.mlp_in) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(unwrapped, nnx.LoRAParam))
    kernels, base_kernels = _kernels(unwrapped), _kernels(base)
    assert kernels.keys() == base_kernels.keys()
    assert all((kernels[k] == base_kernels[k]).all() for k in kernels)


COST_TOKENS = jax.random.randint(jax.random.key(3), (8, 65), 0, CONFIG.vocab_size)


def _step_cost(step, *nodes) -> dict[str, float]:
    """XLA's cost analysis of ``step(*nodes, tokens)`` compiled as a pure function of the
    nodes' state (what ``nnx.jit`` compiles)."""
    graphdef, state = nnx.split(nodes)

    def pure(state, tokens):
        nodes = nnx.merge(graphdef, state)
        return step(*nodes, tokens), nnx.state(nodes)

    cost = jax.jit(pure).lower(state, COST_TOKENS).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {k: float(cost[k]) for k in ("flops", "bytes accessed")}


def _functional_grad_cost(base: nnx.Module) -> float:
    """FLOPs of the functional path's loss and factor gradients on ``base``'s state: the
    wrapped ``nnx.Param`` state through lorax.lora and lorax.value_and_grad."""
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)

    @lorax.lora
    def forward(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        return loss_fn(model, tokens), nnx.state(model, nnx.Not(nnx.Param))

    grad_fn = lorax.value_and_grad(forward, has_aux=True)
    cost = jax.jit(grad_fn).lower(lorax.wrap(params, rank=RANK), rest, COST_TOKENS).compile()
    cost = cost.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def test_the_module_step_costs_what_the_functional_step_costs():
    """The module's loss and gradients cost what the functional path's cost on the same model
    (FLOPs within 1%), and its whole nnx.Optimizer step is far below full fine-tuning's: no
    W-sized gradient, no W + s·A·B, no optimizer state for W. The blocks are a Python loop so
    that the cost analysis counts every layer (it counts a scan body once)."""
    def full_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return loss

    def grads_only(model, tokens):
        return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model, tokens)

    base = _base(unroll=True, d=128, max_len=64)
    full = _step_cost(full_step, base, nnx.Optimizer(base, optax.adam(1e-2), wrt=nnx.Param))
    model = lorax.wrap(base, rank=RANK)
    step = _step_cost(_train_step.__wrapped__, model,
                      nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam))
    grads = _step_cost(grads_only, model)
    ref = _functional_grad_cost(base)
    assert abs(grads["flops"] / ref - 1) < 0.01, (grads, ref)
    assert step["flops"] / full["flops"] < 0.75, (step, full)
    assert step["bytes accessed"] / full["bytes accessed"] < 0.85, (step, full)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 16, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.fc(x))
        for layer in self.hidden:  # owners inside an nnx.List
            x = nnx.relu(layer(x))
        return self.out(x)


X = jax.random.normal(jax.random.key(4), (3, 8))


def _trained_mlp(**wrap_kw) -> nnx.Module:
    model = lorax.wrap(MLP(nnx.Rngs(0)), rank=2, **wrap_kw)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        variable.set_value(variable.get_value() + 0.1)  # b != 0: the adapter does something
    return model


def test_save_restore_and_checkpoint_manager_with_an_nnx_optimizer(tmp_path):
    model = _trained_mlp()
    lorax.save(tmp_path / "one", model)
    restored = lorax.restore(tmp_path / "one", lorax.wrap(MLP(nnx.Rngs(0)), rank=2))
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(restored, nnx.LoRAParam)),
                                      nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
                                      strict=True):
        np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=str(path))
    # the plain base module: the settings come from the checkpoint
    from_base = lorax.restore(tmp_path / "one", MLP(nnx.Rngs(0)))
    np.testing.assert_array_equal(from_base(X), model(X))

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: (m(X) ** 2).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model)
        optimizer.update(model, grads)

    step(model, optimizer)
    with lorax.CheckpointManager(tmp_path / "run", async_save=False) as manager:
        manager.save(1, model, opt_state=optimizer)
        like = lorax.wrap(MLP(nnx.Rngs(0)), rank=2)
        fresh = nnx.Optimizer(like, optax.adam(1e-2), wrt=nnx.LoRAParam)
        got = manager.restore(like, opt_state=fresh)
    np.testing.assert_array_equal(got.tree(X), model(X))
    assert isinstance(got.opt_state, nnx.Optimizer)
    for a, b in zip(jax.tree.leaves(nnx.state(got.opt_state)),
                    jax.tree.leaves(nnx.state(optimizer)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_peft_summary_and_merge_read_the_module_as_the_functional_tree(tmp_path):
    model = _trained_mlp()
    tree = lorax.modules.module_tree(model)
    name_map = {"fc/kernel": "fc", "out/kernel": "out", "hidden/0/kernel": "hidden.0",
                "hidden/1/kernel": "hidden.1"}
    lorax.peft.save(tmp_path / "module", model, name_map=name_map)
    lorax.peft.save(tmp_path / "tree", tree, name_map=name_map)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "module" / name).read_bytes() == (tmp_path / "tree" / name).read_bytes()
    loaded = lorax.peft.load(tmp_path / "module", MLP(nnx.Rngs(0)), name_map=name_map)
    assert_close(loaded(X), model(X), ulps=64)
    assert str(lorax.summary(model)) == str(lorax.summary(tree))
    assert lorax.summary(model).trainable == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    merged = lorax.merge(model)
    want = jax.tree.map(np.asarray, lorax.merge(tree))
    np.testing.assert_array_equal(merged.fc.kernel.get_value(), want["fc"]["kernel"].get_value())


def test_named_adapters_dora_and_qlora_on_a_module():
    base = MLP(nnx.Rngs(0))
    two = lorax.add_adapter(lorax.add_adapter(base, "fr", rank=2), "de", rank=3)
    assert {"kernel_lora_fr_a", "kernel_lora_de_b"} <= set(vars(two.fc))
    fr = lorax.select(two, "fr")
    fr.fc.kernel_lora_fr_b.set_value(jnp.ones_like(fr.fc.kernel_lora_fr_b.get_value()))
    tree = lorax.modules.module_tree(fr)
    want = lorax.lora(lambda p, x: nnx.merge(nnx.graphdef(base), p)(x))(tree, X)
    assert_close(fr(X), want)
    assert_close(fr(X), lorax.merge(fr)(X), ulps=256)

    dora = lorax.wrap(base, rank=2, dora=True)
    assert "kernel_lora_magnitude" in vars(dora.fc)
    np.testing.assert_allclose(dora(X), base(X), rtol=1e-5, atol=1e-6)

    qlora = lorax.quantize(lorax.wrap(base, rank=2), "nf4")
    assert type(qlora.fc.kernel.get_value()).__name__ == "QuantizedArray"
    optimizer = nnx.Optimizer(qlora, optax.adam(1e-2), wrt=nnx.LoRAParam)
    loss = lambda m: ((m(X) - 1.0) ** 2).mean()  # noqa: E731
    before = float(loss(qlora))
    for _ in range(3):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(qlora)
        optimizer.update(qlora, grads)
    assert float(loss(qlora)) < before
    want = lorax.lora(lambda p, x: nnx.merge(nnx.graphdef(base), p)(x))(
        lorax.modules.module_tree(qlora), X)
    assert_close(qlora(X), want)


def test_lora_dropout_on_a_module_follows_train_and_eval():
    model = lorax.wrap(MLP(nnx.Rngs(0)), rank=2, dropout=0.5)
    b = model.out.kernel_lora_b
    b.set_value(jnp.ones_like(b.get_value()))
    first, second = model(X), model(X)
    assert not np.array_equal(first, second)  # a new mask each call: the counter advances
    model.eval()
    np.testing.assert_array_equal(model(X), model(X))
    tree = lorax.modules.module_tree(model)
    want = lorax.lora(lambda p, x: nnx.merge(nnx.graphdef(MLP(nnx.Rngs(0))), p)(x))(tree, X)
    assert_close(model(X), want)


def test_mistakes_get_errors_that_name_the_fix():
    model = lorax.wrap(MLP(nnx.Rngs(0)), rank=2)
    with pytest.raises(ValueError, match="already has nnx.LoRAParam"):
        lorax.wrap(model, rank=2)
    with pytest.raises(TypeError, match=r"Wrap the module itself, model = lorax.wrap"):
        lorax.lora(model)
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    wrapped = lorax.wrap(state, rank=2)
    closes_over = lorax.lora(lambda x: nnx.merge(graphdef, wrapped)(x))
    with pytest.raises(TypeError, match="pass the wrapped tree to it as an argument"):
        closes_over(X)

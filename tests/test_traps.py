"""The traps a new user falls into: each is refused early with a message that names the fix."""

import dataclasses
import functools
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
from helpers import (
    assert_close,
    dense_delta,
    dense_params_jnp,
    lora_nodes,
    perturb_b,
    wrap_filled,
)

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



# --- round 3: mixed precision, forward mode, optimizer states, unwrapped trees ---------------

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _factors(tree):
    return np.concatenate([np.ravel(n.a) for n in lora_nodes(tree)])


def _bf16_mlp():
    """A bf16 base model (two bf16 Dense layers) on bf16 inputs, with a regression target."""
    model = nn.Sequential([nn.Dense(64), jnp.tanh, nn.Dense(8)])
    rng = np.random.default_rng(0)
    params = {name: {"kernel": rng.standard_normal(shape) / np.sqrt(shape[0]),
                     "bias": np.zeros(shape[1])}
              for name, shape in (("layers_0", (32, 64)), ("layers_2", (64, 8)))}
    params = jax.tree.map(lambda p: jnp.asarray(p, BF16), params)
    x = jnp.linspace(-1.0, 1.0, 16 * 32).reshape(16, 32)
    return model, params, x.astype(BF16), jnp.sin(3.0 * x[:, :8]).astype(BF16)


def _adam_steps(lp, model, x, y, steps=20, lr=1e-4):
    """``steps`` Adam steps of the documented pattern: the trained tree and the last grads."""
    loss = lorax.lora(lambda p, x: jnp.mean(
        (model.apply({"params": p}, x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
    tx = lorax.optimizer(optax.adam(lr))
    train, frozen = lorax.split(lp)

    @jax.jit
    def step(train, state):
        _, grads = lorax.value_and_grad(loss)(lorax.combine(train, frozen), x)
        updates, state = tx.update(grads, state, train)
        return optax.apply_updates(train, updates), state, grads

    state = tx.init(train)
    for _ in range(steps):
        train, state, grads = step(train, state)
    return lorax.combine(train, frozen), grads


def test_bf16_base_trains_float32_factors():
    model, params, x, y = _bf16_mlp()
    lp = wrap_filled(params, rank=4)  # lorax.wrap's factor dtypes, `a` from NumPy
    trained, grads = _adam_steps(lp, model, x, y)
    assert np.mean(_factors(lp) == _factors(trained)) == 0.0  # every entry of `a` moved
    # The trap, as a control: bf16 factors round Adam's lr-sized steps away.
    lp16 = wrap_filled(params, rank=4, dtype=jnp.bfloat16)
    assert np.mean(_factors(lp16) == _factors(_adam_steps(lp16, model, x, y)[0])) > 0.5
    # Mixed precision: float32 factors and gradients, bf16 in -> bf16 out, merge in W's dtype.
    for node in lora_nodes(trained):
        assert (node.w.dtype, node.a.dtype, node.b.dtype) == (BF16, F32, F32)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {F32}
    assert jax.jit(lorax.lora(model.apply))({"params": trained}, x).dtype == BF16
    assert {w.dtype for w in jax.tree.leaves(jax.eval_shape(lorax.merge, trained))} == {BF16}


def _routed(params):
    tree = lorax.add_adapter(params, "p", rank=2, init="gaussian")
    tree = lorax.add_adapter(tree, "q", rank=3, init="gaussian", key=jax.random.key(1))
    rng = np.random.default_rng(2)

    def fill(node):
        if not isinstance(node, lorax.MultiLoRA):
            return node
        return dataclasses.replace(node, adapters={
            name: dataclasses.replace(f, b=jnp.asarray(0.3 * rng.standard_normal(f.b.shape),
                                                       f.b.dtype))
            for name, f in node.adapters.items()})

    return jax.tree.map(fill, tree, is_leaf=lambda n: isinstance(n, lorax.MultiLoRA))


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa", "nf4", "routed"])
def test_float32_factors_on_a_bf16_base_in_every_variant(variant):
    k = jnp.sin(jnp.arange(32 * 16, dtype=jnp.float32)).reshape(32, 16)
    params = {"fc": {"kernel": k.astype(jnp.bfloat16)}}
    x = jnp.cos(jnp.arange(4 * 32, dtype=jnp.float32)).reshape(4, 32).astype(jnp.bfloat16)
    f = lorax.lora(lambda p, x: x @ p["fc"]["kernel"])
    x64 = np.asarray(x, np.float64)
    if variant == "routed":
        tree = _routed(params)
        ids = ["p", "q", None, "q"]
        apply = functools.partial(f, adapter_ids=ids)
        node = tree["fc"]["kernel"]
        w64 = np.asarray(node.w, np.float64)
        kernels = [w64 + (0.0 if i is None else dense_delta(
            node.adapters[i].a, node.adapters[i].b, node.adapters[i].scale)) for i in ids]
        expected = np.stack([x64[n] @ kernels[n] for n in range(len(ids))])
    else:
        tree = perturb_b(lorax.wrap(params, rank=2, dora=variant == "dora",
                                    init="pissa" if variant == "pissa" else "kaiming"), 1)
        if variant == "nf4":
            tree = lorax.quantize(tree, "nf4", block_size=32)
        apply = f
        node = tree["fc"]["kernel"]
        w = node.w.dequantize(jnp.float32) if variant == "nf4" else node.w
        kernel = np.asarray(w, np.float64) + dense_delta(node.a, node.b, node.scale)
        if variant == "dora":  # m * V / ||V||_c, norms over the input axis
            kernel = kernel * np.asarray(node.magnitude, np.float64) / np.linalg.norm(kernel,
                                                                                      axis=0)
        expected = x64 @ kernel
    # The program's dtype out (bf16 in, bf16 out), within a few bf16 roundings of the exact
    # kernel: the inputs, the low-rank products and the output round to bf16 (eps 2^-7).
    y = jax.jit(apply)(tree, x)
    assert y.dtype == BF16
    assert_close(y, expected, dtype=jnp.bfloat16, ulps=8)
    assert jax.eval_shape(apply, tree, x.astype(jnp.float32)).dtype == F32  # f32 in, f32 out
    factors = jax.tree.leaves(lorax.split(tree)[0])
    loss = lorax.value_and_grad(lambda t: jnp.sum(apply(t, x).astype(jnp.float32)))
    grads = jax.tree.leaves(jax.eval_shape(loss, tree)[1])
    assert {a.dtype for a in factors} == {g.dtype for g in grads} == {F32}
    assert jax.eval_shape(lorax.merge, tree)["fc"]["kernel"].dtype == BF16


def _forward_mode_case(consumer):
    """A Flax layer of each consumer kind, its input and the kernel path to adapt."""
    if consumer == "dense":  # x·W + (x·a)·b with a fused epilogue
        model, x = nn.Dense(5), jnp.linspace(-1.0, 1.0, 48).reshape(6, 8)
    elif consumer == "wide":  # a vocabulary-wide output: x·(W + s·a·b), merged in one pass
        model, x = nn.Dense(4096), jnp.linspace(-1.0, 1.0, 128).reshape(16, 8)
    elif consumer == "conv":  # conv with a, then a 1x1 product with b
        model, x = nn.Conv(4, (3,)), jnp.linspace(-1.0, 1.0, 42).reshape(2, 7, 3)
    else:  # an embedding lookup of rows of a, then ·b
        model, x = nn.Embed(10, 4), jnp.array([[1, 2, 3], [4, 5, 9]])
    params = model.init(jax.random.key(0), x)["params"]
    kernel = "embedding" if consumer == "embed" else "kernel"
    return model, x, perturb_b(lorax.wrap(params, rank=2, targets=f"^{kernel}$"), 1)


@pytest.mark.parametrize("consumer", ["dense", "wide", "conv", "embed"])
def test_forward_mode_autodiff_matches_the_dense_kernel(consumer):
    model, x, lp = _forward_mode_case(consumer)
    train, frozen = lorax.split(lp)

    def factorized(train, x):
        return lorax.lora(model.apply)({"params": lorax.combine(train, frozen)}, x)

    def dense(train, x):  # x·(W + s·a·b), with the kernel formed by the test's own einsum
        return model.apply({"params": dense_params_jnp(lorax.combine(train, frozen))}, x)

    tangent = jax.tree.map(jnp.cos, train)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(f, train, x):
        out = {"jvp": jax.jvp(lambda t: f(t, x), (train,), (tangent,))}
        if consumer == "wide":  # its Jacobian in the factors is 16·4096 x 8208: take x's
            out["jacfwd"] = jax.jacfwd(f, argnums=1)(train, x)
        else:
            out["jacfwd"] = jax.jacfwd(f)(train, x)
        if consumer == "dense":  # forward over reverse
            out["hessian"] = jax.hessian(lambda t: jnp.sum(f(t, x) ** 2))(train)
        if jnp.issubdtype(x.dtype, jnp.floating):
            out["jvp_x"] = jax.jvp(lambda x: f(train, x), (x,), (jnp.sin(x),))
        return out

    assert_close(derivatives(factorized, train, x), derivatives(dense, train, x))


def test_forward_mode_through_a_quantized_base_names_the_fix():
    k = jnp.sin(jnp.arange(16 * 8, dtype=jnp.float32)).reshape(16, 8)
    qp = lorax.quantize(perturb_b(lorax.wrap({"fc": {"kernel": k}}, rank=2), 1), "int8",
                        block_size=8)
    f = lorax.lora(lambda p, x: x @ p["fc"]["kernel"])
    x = jnp.linspace(-1.0, 1.0, 48).reshape(3, 16)
    fix = r"forward-mode .*'fc/kernel'.*lorax\.quantization\.dequantize\(tree\)"
    with pytest.raises(TypeError, match=fix):
        jax.jvp(lambda x: f(qp, x), (x,), (x,))
    with pytest.raises(TypeError, match=fix):
        jax.jacfwd(lambda x: f(qp, x))(x)
    # The fix: the dequantized base computes the same values, in both modes.
    deq = lorax.quantization.dequantize(qp)
    node = deq["fc"]["kernel"]
    assert node.w.dtype == F32 and node.a is qp["fc"]["kernel"].a
    kernel = np.asarray(node.w, np.float64) + dense_delta(node.a, node.b, node.scale)
    assert_close(f(qp, x), f(deq, x))
    assert_close(jax.jvp(lambda x: f(deq, x), (x,), (jnp.cos(x),))[1],
                 np.asarray(jnp.cos(x), np.float64) @ kernel)


def _mid_tree():
    params = {"mid": {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), "bias": jnp.zeros(4)}}
    lp = perturb_b(lorax.wrap(params, rank=2), 1)
    loss = lorax.lora(lambda p, x: jnp.sum(jnp.tanh(x @ p["mid"]["kernel"]
                                                    + p["mid"]["bias"][None])))
    return params, lp, loss


def test_update_takes_the_state_of_the_whole_tree_or_of_its_half():
    _, lp, loss = _mid_tree()
    x = jnp.linspace(-1.0, 1.0, 24).reshape(3, 8)
    train, frozen = lorax.split(lp)
    _, grads = lorax.value_and_grad(loss)(lp, x)
    # Adam's first two steps on the factors alone, as plain optax computes them.
    adam, leaves = optax.adam(1e-2), jax.tree.leaves(train)
    first, adam_state = adam.update(jax.tree.leaves(grads), adam.init(leaves), leaves)
    second, _ = adam.update(jax.tree.leaves(grads), adam_state, leaves)
    tx = lorax.optimizer(optax.adam(1e-2))
    for state in (tx.init(lp), tx.init(train)):  # MaskedNode or None for the frozen leaves
        for params in (train, lp):
            updates, new_state = tx.update(grads, state, params)
            assert jax.tree.structure(new_state) == jax.tree.structure(state)
            assert jax.tree.structure(updates) == jax.tree.structure(grads)
            assert_close(jax.tree.leaves(updates), first)
            updates, _ = jax.jit(tx.update)(grads, new_state, params)
            assert_close(jax.tree.leaves(updates), second)
    other = lorax.split(lorax.wrap({"mid": {"kernel": jnp.ones((8, 4))}}, rank=3))[0]
    with pytest.raises(ValueError, match=r"`state`.*shape \[8, 2\].*got shape \[8, 3\].*init"):
        tx.update(grads, tx.init(other), train)


def test_training_an_unwrapped_tree_is_refused():
    params, lp, loss = _mid_tree()
    x = jnp.ones((3, 8))
    tx = lorax.optimizer(optax.adam(1e-3))
    fix = r"^no trainable leaves: wrap the tree with lorax\.wrap first"
    with pytest.raises(ValueError, match=fix + r".*argument 0 of the differentiated function"):
        lorax.value_and_grad(loss)(params, x)
    with pytest.raises(ValueError, match=fix + r".*`params` of init"):
        tx.init(params)
    # The structure functions stay usable on any tree; training its "trainable half" is not.
    train, frozen = lorax.split(params)
    assert jax.tree.leaves(train) == [] and frozen["mid"]["kernel"] is params["mid"]["kernel"]
    assert not any(jax.tree.leaves(lorax.trainable(params)))
    with pytest.raises(ValueError, match=fix):
        tx.init(train)
    _, grads = lorax.value_and_grad(loss)(lp, x)  # the wrapped tree trains
    tx.update(grads, tx.init(lorax.split(lp)[0]), lorax.split(lp)[0])


def test_multisteps_accumulates_through_lorax_optimizer():
    _, lp, loss = _mid_tree()
    lr, k = 1e-2, 3
    tx = lorax.optimizer(optax.MultiSteps(optax.adam(lr), every_k_schedule=k))
    train, frozen = lorax.split(lp)
    state, params, all_grads = tx.init(train), train, []
    for i in range(k):
        _, grads = lorax.value_and_grad(loss)(lp, jnp.linspace(-1.0, 1.0, 24).reshape(3, 8) * i)
        all_grads.append(grads)
        updates, state = tx.update(grads, state, params)
        if i < k - 1:  # mini-steps accumulate and change nothing
            assert not any(np.any(u) for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
    # One Adam step on the mean gradient: m̂ = g, v̂ = g², so the step is -lr·g/(|g| + eps).
    mean = jax.tree.map(lambda *g: sum(g) / k, *all_grads)
    expected = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), train, mean)
    assert_close(params, expected)
    assert lorax.combine(params, frozen)["mid"]["kernel"].w is lp["mid"]["kernel"].w

"""Adapter checkpoints: exact round trips, validation, crash safety, size, sharded restore."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_equal, bits

import lorax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "attn": {"query": {"kernel": jax.random.normal(keys[0], (32, 4, 8), dtype),
                           "bias": jnp.zeros((4, 8), dtype)}},
        "mlp": {"kernel": jax.random.normal(keys[1], (32, 64), dtype)},
        "head": {"kernel": jax.random.normal(keys[2], (64, 1), dtype)},
    }


def _trained(tree, seed=1):
    """A tree whose factors and train leaves all differ from their initial values."""
    key = jax.random.key(seed)

    def bump(node):
        if lorax.is_lora(node):
            a = node.a + jax.random.normal(key, node.a.shape, node.a.dtype)
            b = jax.random.normal(jax.random.fold_in(key, 1), node.b.shape, node.b.dtype)
            return dataclasses.replace(node, a=a, b=b)
        if isinstance(node, lorax.FullyTrained):
            return lorax.FullyTrained(node.value + 1)
        return node

    def is_node(x):
        return isinstance(x, lorax.LoRA | lorax.FullyTrained)

    return jax.tree.map(bump, tree, is_leaf=is_node)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    lp = _trained(lorax.wrap(_params(dtype), rank=4, train="^head/", targets="attn|mlp"))
    tx = lorax.optimizer(optax.adam(1e-3))
    opt_state = tx.init(lp)
    grads = jax.tree.map(jnp.ones_like, lp)
    _, opt_state = tx.update(grads, opt_state, lp)  # non-trivial Adam moments
    fresh = lorax.wrap(_params(dtype), rank=4, train="^head/", targets="attn|mlp",
                       key=jax.random.key(7))
    with lorax.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, lp, opt_state=opt_state, data={"batch": 17})
        mgr.wait_until_finished()
        restored = mgr.restore(fresh, opt_state=tx.init(fresh))
    assert restored.step == 3 and restored.data == {"batch": 17}
    assert_trees_equal(restored.tree, lp)
    assert_trees_equal(restored.opt_state, opt_state)
    # The frozen W in the result are the ones of the tree restored into, not copies from disk.
    assert restored.tree["mlp"]["kernel"].w is fresh["mlp"]["kernel"].w


def test_save_restore_functions_and_extra(tmp_path):
    lp = _trained(lorax.wrap(_params(), rank=2, targets="attn|mlp"))
    extra = {"step": jnp.int32(5), "ema": jnp.arange(3.0)}
    assert lorax.save(tmp_path, lp) == 0
    assert lorax.save(tmp_path, lp, extra=extra) == 1
    like = lorax.wrap(_params(), rank=2, targets="attn|mlp")
    tree, got_extra = lorax.restore(tmp_path, like, extra=extra)
    assert_trees_equal(tree, lp)
    assert_trees_equal(got_extra, extra)
    old = lorax.restore(tmp_path, like, step=0)
    assert bits(old["mlp"]["kernel"].b) == bits(lp["mlp"]["kernel"].b)


def test_restore_into_plain_params_rebuilds_the_wrap_from_metadata(tmp_path):
    # Ranks, scales, a non-canonical layout (Gemma's q_einsum), DoRA and `train` leaves all
    # come from the saved metadata; the result equals restoring into the wrapped tree.
    params = {**_params(), "q_einsum": {"w": jax.random.normal(jax.random.key(3), (4, 32, 8))}}
    lp = lorax.wrap(params, rank=4, rank_pattern={"mlp": 2}, alpha_pattern={"attn": 3.0},
                    train="^head/", dora=True, rslora=True, dropout=0.1)
    lp = _trained(lp)
    lorax.save(tmp_path, lp)
    got = lorax.restore(tmp_path, params)
    want = lorax.restore(tmp_path, lorax.wrap(params, rank=4, rank_pattern={"mlp": 2},
                                              alpha_pattern={"attn": 3.0}, train="^head/",
                                              dora=True, rslora=True, dropout=0.1))
    assert jax.tree.structure(got) == jax.tree.structure(want)  # static fields included
    assert_trees_equal(got, lp)
    assert got["q_einsum"]["w"].layout == "oio" and got["mlp"]["kernel"].rank == 2
    assert got["mlp"]["kernel"].w is params["mlp"]["kernel"]


def test_restore_into_sharded_plain_params_places_factors_like_wrap(tmp_path):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    params = jax.device_put(_params(), NamedSharding(mesh, P(None, "model")))
    lp = _trained(lorax.wrap(params, rank=2, dora=True, targets="attn|mlp"))
    lorax.save(tmp_path, lp)
    got = lorax.restore(tmp_path, params)
    assert_trees_equal(got, lp)
    want = lorax.shardings(lp, jax.tree.map(lambda x: x.sharding.spec, params), mesh)
    assert jax.tree.map(lambda x: x.sharding, got) == want


def test_restore_into_plain_params_refuses_what_metadata_cannot_rebuild(tmp_path):
    params = _params()
    lorax.save(tmp_path / "named", lorax.add_adapter(params, "fr", rank=1, targets="attn"))
    with pytest.raises(ValueError, match="named adapters at 'attn/query/kernel\\[fr\\]'"):
        lorax.restore(tmp_path / "named", params)
    lorax.save(tmp_path / "pissa", lorax.wrap(params, rank=1, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA factors at .*restore into the wrapped tree"):
        lorax.restore(tmp_path / "pissa", params)
    lorax.save(tmp_path / "plain", lorax.wrap(params, rank=1))
    other = {**params, "mlp": {"kernel": jnp.ones((32, 65))}}  # not the base it was saved on
    with pytest.raises(lorax.CheckpointMismatchError, match="mlp/kernel"):
        lorax.restore(tmp_path / "plain", other)


def test_only_adapters_reach_disk(tmp_path):
    big = {"layer": {"kernel": jnp.ones((1024, 1024))}}  # 4 MiB base kernel
    lp = _trained(lorax.wrap(big, rank=8))
    lorax.save(tmp_path, lp)
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path) for f in fs)
    factor_bytes = 2 * 1024 * 8 * 4
    assert on_disk <= 1.1 * factor_bytes + 64 * 1024, on_disk


def _expect_mismatch(tmp_path, like, *fragments):
    with pytest.raises(lorax.CheckpointMismatchError) as err:
        lorax.restore(tmp_path, like)
    for fragment in fragments:
        assert fragment in str(err.value)
    return str(err.value)


def test_mismatches_are_listed(tmp_path):
    lorax.save(tmp_path, lorax.wrap(_params(), rank=4, targets="attn|mlp"))
    _expect_mismatch(tmp_path, lorax.wrap(_params(), rank=2, targets="attn|mlp"),
                     "mlp/kernel: rank saved 4 vs expected 2",
                     "attn/query/kernel: rank saved 4 vs expected 2")
    _expect_mismatch(tmp_path, lorax.wrap(_params(), rank=4, targets="mlp"),
                     "attn/query/kernel: adapter in the checkpoint, not in the tree")
    _expect_mismatch(tmp_path, lorax.wrap(_params(), rank=4, rank_pattern={"head": 1}),
                     "head/kernel: adapter in the tree, not in the checkpoint")
    _expect_mismatch(tmp_path, lorax.wrap(_params(), rank=4, targets="attn|mlp",
                                          dtype=jnp.bfloat16), "bfloat16")
    _expect_mismatch(tmp_path, lorax.wrap(_params(), rank=4, targets="attn|mlp",
                                          in_axes={"attn": 2, "mlp": 1}),
                     "attn/query/kernel: n_in saved 1 vs expected 2")
    other = _params()
    other["head"]["kernel"] = jnp.ones((64, 2))
    _expect_mismatch(tmp_path, lorax.wrap(other, rank=4, targets="attn|mlp"),
                     "head/kernel: base saved [[64, 1], 'float32'] vs expected "
                     "[[64, 2], 'float32']")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lorax checkpoint"):
        lorax.restore(tmp_path, lorax.wrap(_params(), rank=1))
    lorax.save(tmp_path, lorax.wrap(_params(), rank=1))
    with pytest.raises(FileNotFoundError, match="no step 9"):
        lorax.restore(tmp_path, lorax.wrap(_params(), rank=1), step=9)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_files_give_a_clear_error(tmp_path, damage):
    lp = _trained(lorax.wrap(_params(), rank=4, targets="attn|mlp"))
    lorax.save(tmp_path, lp)
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "0" / "adapters")
                  for f in fs if os.path.getsize(os.path.join(r, f)) > 1000]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            if damage == "truncate":
                f.truncate(os.path.getsize(path) // 3)
            else:
                f.seek(100)
                f.write(b"\xff" * 200)
    with pytest.raises(ValueError, match="could not read checkpoint .*corrupted or truncated"):
        lorax.restore(tmp_path, lorax.wrap(_params(), rank=4, targets="attn|mlp"))


_KILLED_WRITER = textwrap.dedent("""
    import asyncio, sys, time
    import jax, jax.numpy as jnp, lorax
    from orbax.checkpoint._src.path import atomicity

    directory = sys.argv[1]
    params = {"kernel": jnp.ones((256, 256))}
    lp = lorax.wrap(params, rank=8)
    with lorax.CheckpointManager(directory, async_save=False) as mgr:
        mgr.save(1, lp)
    # Step 2: hold the commit (the atomic rename) until we are killed.
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def stalled_finalize(self, *args, **kwargs):
        print("WRITTEN-NOT-COMMITTED", flush=True)
        await asyncio.sleep(600)
        return await original(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = stalled_finalize
    bumped = jax.tree.map(lambda x: x + 1, lp)
    mgr = lorax.CheckpointManager(directory, async_save=True)
    mgr.save(2, bumped)
    time.sleep(600)
""")


def test_sigkill_mid_save_keeps_previous_step(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(directory)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "WRITTEN-NOT-COMMITTED" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WRITTEN-NOT-COMMITTED" in line, "writer did not reach the commit point"
        leftovers = [n for n in os.listdir(directory) if n not in ("0", "1")]
        assert leftovers, "step 2 should be half-written on disk when the process dies"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    like = lorax.wrap({"kernel": jnp.ones((256, 256))}, rank=8)
    with lorax.CheckpointManager(directory, async_save=False) as mgr:
        assert mgr.all_steps() == [1] and mgr.latest_step() == 1
        restored = mgr.restore(like)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.tree["kernel"].a, like["kernel"].a)


_SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, lorax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    directory = sys.argv[1]
    params = {"kernel": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)}
    lp = lorax.wrap(params, rank=8, key=jax.random.key(3))
    lp = jax.tree.map(lambda x: x, lp)
    lorax.save(directory, lp)
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    a_sharding = NamedSharding(mesh, P("fsdp", None))
    b_sharding = NamedSharding(mesh, P(None, "fsdp"))
    node = lp["kernel"]
    like = {"kernel": lorax.LoRA(
        w=jax.device_put(node.w, NamedSharding(mesh, P("fsdp", None))),
        a=jax.ShapeDtypeStruct(node.a.shape, node.a.dtype, sharding=a_sharding),
        b=jax.ShapeDtypeStruct(node.b.shape, node.b.dtype, sharding=b_sharding),
        scale=node.scale, rank=node.rank, n_stack=0, n_in=1, path=node.path)}
    restored = lorax.restore(directory, like)["kernel"]
    assert restored.a.sharding == a_sharding, restored.a.sharding
    assert restored.b.sharding == b_sharding, restored.b.sharding
    shards = restored.a.addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (8, 8) for s in shards)
    np.testing.assert_array_equal(np.asarray(restored.a), np.asarray(node.a))
    np.testing.assert_array_equal(np.asarray(restored.b), np.asarray(node.b))
    print("SHARDED-OK")
""")


def test_sharded_restore_on_8_cpu_devices(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]

"""Bytes and peak memory: parameter trees, optimizer state, checkpoints on disk, peak RSS.

Tree, optimizer-state and checkpoint sizes are computed in this process (the optimizer state
abstractly); peak RSS is measured in a fresh ``python -m experiments.bench --_worker KIND``
subprocess per kind of run (:func:`run_worker`, :func:`worker_main`), so that one run's
high-water mark does not hide another's.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from typing import Any

import jax
import numpy as np
import optax

import lorax
from experiments.bench.steps import make_steps
from experiments.bench.workloads import make_workload

WORKER_KINDS = ("init", "lora", "full")
"""What a ``--_worker`` subprocess does: build the model only, or also train (LoRA or full)."""

RSS_STEPS = 3
"""Training steps of a ``--_worker`` run (after one warm-up step); peak memory is reached in
the first."""


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (concrete or ``jax.ShapeDtypeStruct``).

    Example:
        >>> import jax.numpy as jnp
        >>> tree_bytes({"a": jnp.zeros((2, 3)), "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
        32
    """
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def factor_bytes(tree: Any) -> int:
    """Bytes of the LoRA factors ``a`` and ``b`` of a wrapped tree (``train`` leaves excluded).

    Example:
        >>> import jax.numpy as jnp
        >>> factor_bytes(lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2))  # (8*2 + 2*4) * 4
        96
    """
    nodes = [n for n in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    return tree_bytes([(n.a, n.b) for n in nodes])

def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes.

    Example:
        >>> fmt_bytes(1536), fmt_bytes(3 * 2**30), fmt_bytes(None)
        ('1.5 KiB', '3.00 GiB', '-')
    """
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.1f} {unit}"
    return f"{int(n)} B"

def optstate_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of ``tx.init(params)``, computed abstractly (nothing is allocated).

    Example:
        >>> import jax.numpy as jnp
        >>> optstate_bytes(optax.adam(1e-3), {"w": jnp.zeros((10, 10))})  # mu, nu, count
        804
    """
    return tree_bytes(jax.eval_shape(tx.init, params))


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files under ``path``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def checkpoint_bytes(tree: Any) -> int:
    """Bytes on disk of an orbax ``StandardCheckpointer`` checkpoint of ``tree``.

    The tree is saved into a temporary directory, which is removed afterwards. The benchmark
    saves the trainable half of :func:`lorax.split` this way (``ckpt_bytes``), and also records
    what :func:`lorax.save` writes (``ckpt_bytes_lorax_save``).
    """
    import orbax.checkpoint as ocp

    with tempfile.TemporaryDirectory(prefix="lorax-bench-") as tmp:
        path = os.path.join(os.path.abspath(tmp), "ckpt")
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(path, tree)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        return dir_bytes(path)


def lorax_save_bytes(tree: Any) -> int:
    """Bytes on disk of :func:`lorax.save` of a wrapped tree (adapters and metadata, never W)."""
    with tempfile.TemporaryDirectory(prefix="lorax-bench-") as tmp:
        lorax.save(tmp, tree)
        return dir_bytes(tmp)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of the process's
    own address space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback elsewhere; on Linux
    it is unusable for a subprocess, because ``execve`` carries the parent's high-water mark
    over (a worker started by a 1.5 GiB parent reports at least 1.5 GiB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_worker(kind: str, model: str, rank: int, quick: bool, steps: int = RSS_STEPS) -> int:
    """Peak RSS in bytes of a fresh ``python -m experiments.bench --_worker KIND`` process.

    ``init`` builds the model and batch only; ``lora`` and ``full`` then run ``steps`` training
    steps (after one warm-up step) and exit.
    """
    command = [sys.executable, "-m", "experiments.bench", "--_worker", kind, "--models", model,
               "--ranks", str(rank), "--steps", str(steps)]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(command[1:])} failed:\n{done.stderr[-4000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def worker_main(kind: str, model: str, rank: int, steps: int, quick: bool) -> dict[str, Any]:
    """The body of a ``--_worker`` process: one kind of training run, then its peak RSS."""
    workload = make_workload(model, quick)
    fns = make_steps(workload)
    batch = workload.batch
    if kind == "lora":
        trainable, frozen = lorax.split(workload.wrap(rank))
        opt_state = fns.tx_lora.init(trainable)
        step = jax.jit(fns.lora, donate_argnums=(0, 2))
        for _ in range(steps + 1):
            trainable, opt_state, loss = step(trainable, frozen, opt_state, batch)
        jax.block_until_ready(loss)
    elif kind == "full":
        params = workload.params
        opt_state = fns.tx_full.init(params)
        step = jax.jit(fns.full, donate_argnums=(0, 1))
        for _ in range(steps + 1):
            params, opt_state, loss = step(params, opt_state, batch)
        jax.block_until_ready(loss)
    return {"kind": kind, "model": model, "rank": rank, "peak_rss_bytes": peak_rss_bytes()}

"""Multi-host LoRA training with ``jax.distributed``: one process per host, one global Mesh.

The GPT decoder of :mod:`experiments.gpt`, CPU-sized, is initialised directly sharded, wrapped with
:func:`lorax.wrap` (the factors land on the shardings of their kernels), and its adapters are
trained on synthetic token sequences; each process feeds only the rows of the global batch that
live on its own devices. Adapters and optimizer state are checkpointed with
:class:`lorax.CheckpointManager` (orbax, multi-host aware: every process writes its shards);
a restarted job resumes from the newest checkpoint.

The mesh axes say how the base model is sharded:

* ``data``: the batch is split over it (and over ``fsdp``); parameters are replicated.
* ``fsdp``: every kernel is sharded along its largest divisible axis (ZeRO-3 / FSDP).
* ``model``: Megatron tensor parallelism: attention q/k/v and the FFN input projection
  (``ffn_in``) are column-sharded, the attention ``out`` and ``ffn_out`` row-sharded.

The factors follow their kernel's spec (:func:`lorax.factor_specs`): ``a`` keeps the kernel's
input-axis sharding, ``b`` its output-axis sharding, the rank axis is never split.

Launch, two hosts with 8 accelerators each (run the same command on every host, changing only
``--process-id``; the coordinator is host 0's address and any free port)::

    # host 0
    python -m experiments.train_distributed --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 0 --mesh data=2,fsdp=8 \\
        --ckpt-dir /shared/lorax-run --steps 1000 --save-every 100
    # host 1
    python -m experiments.train_distributed --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 1 --mesh data=2,fsdp=8 \\
        --ckpt-dir /shared/lorax-run --steps 1000 --save-every 100

On Cloud TPU pods, SLURM or Open MPI, ``--auto`` lets ``jax.distributed.initialize()`` detect
the cluster instead::

    # SLURM, one task per node
    srun --ntasks-per-node=1 python -m experiments.train_distributed --auto \
        --mesh data=-1,fsdp=8 --ckpt-dir /shared/lorax-run
    # a TPU pod slice, every worker at once
    gcloud compute tpus tpu-vm ssh my-pod --worker=all --command="cd lorax && \
        python -m experiments.train_distributed --auto --mesh data=-1,model=4 \
        --ckpt-dir gs://my-bucket/lorax-run"

The checkpoint directory must be shared by all hosts (NFS, GCS ``gs://...``). After a failure,
rerun the same commands: training resumes from the newest complete checkpoint.

On one machine with CPUs only (2 processes x 2 devices, gloo collectives)::

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      python -m experiments.train_distributed --coordinator 127.0.0.1:12345 \\
          --num-processes 2 --process-id $i --mesh data=2,fsdp=2 --ckpt-dir /tmp/lorax-run &
    done; wait

Each process prints one JSON line per event (``lorax-event {...}``): start, step losses (on
process 0), checkpoint saves, and a final factor checksum.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lorax
from experiments import gpt
from lorax.paths import path_str

EVENT = "lorax-event"
# Adapted kernels: attention projections and the FFN (not the embeddings or the LM head).
TARGETS = (r"attn/(query|key|value|out)/kernel$", r"ffn_(in|out)/kernel$")


@dataclasses.dataclass(frozen=True)
class Config:
    """Model, data and optimisation settings (defaults are CPU-sized)."""

    vocab: int = 64
    d_model: int = 64
    heads: int = 4
    d_ff: int = 256
    layers: int = 2
    seq_len: int = 16
    batch_size: int = 8  # global, over all processes
    rank: int = 2
    alpha: float = 4.0
    lr: float = 3e-2
    optimizer: str = "adamw"
    steps: int = 6
    seed: int = 0

    def model_config(self) -> gpt.GPTConfig:
        """The :class:`experiments.gpt.GPT` these settings describe (positions up to
        ``seq_len``).

        Example:
            >>> Config(layers=1).model_config().n_layers
            1
        """
        return gpt.GPTConfig(vocab_size=self.vocab, d_model=self.d_model, n_layers=self.layers,
                             n_heads=self.heads, d_ff=self.d_ff, max_len=self.seq_len)


def batch_rows(config: Config, step: int, rows: range) -> np.ndarray:
    """Rows ``rows`` of the global batch of ``step``: sequences ``t -> (start + c*t) % vocab``.

    Row ``i`` depends only on ``(seed, step, i)``, so a process can build just its own rows.

    Example:
        >>> batch_rows(Config(vocab=7, seq_len=4), 0, range(1)).shape
        (1, 4)
    """
    out = np.empty((len(rows), config.seq_len), np.int32)
    for k, i in enumerate(rows):
        rng = np.random.default_rng((config.seed, step, i))
        start, c = rng.integers(config.vocab, size=2)
        t = np.arange(config.seq_len)
        out[k] = (start + c * t) % config.vocab
    return out


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` to ``{"data": 2, "fsdp": 4}`` (one size may be ``-1``: the rest).

    Example:
        >>> parse_mesh("data=-1,model=2")
        {'data': -1, 'model': 2}
    """
    axes = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if name not in ("data", "fsdp", "model") or not re.fullmatch(r"-1|[1-9]\d*", size):
            raise ValueError(f"expected axes like data=2,fsdp=4,model=2, got {item!r}")
        axes[name] = int(size)
    return axes


def make_mesh(axes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over ``devices`` (default: all, over all processes) with the named axis sizes.

    Example:
        >>> make_mesh({"data": -1}).shape["data"] == jax.device_count()
        True
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(axes)
    free = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(free) > 1 or (free and len(devices) % known):
        raise ValueError(f"cannot fit mesh {axes} on {len(devices)} devices")
    if free:
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"got {len(devices)}")
    # jax.devices() orders devices process by process, so the leading (data) axis spans hosts
    # and the inner axes (fsdp, model: the chattier ones) stay within a host.
    return Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))


def _tp_axis(path: str, ndim: int) -> int | None:
    """Which axis of a kernel Megatron-style tensor parallelism shards (``None``: replicate)."""
    if re.search(r"attn/(query|key|value)/kernel$", path):
        return 1  # (d, heads, head_dim): column-parallel over heads
    if re.search(r"attn/out/kernel$", path):
        return 0  # (heads, head_dim, d): row-parallel over heads
    if re.search(r"ffn_in/kernel$", path):
        return ndim - 1  # column-parallel
    if re.search(r"ffn_out/kernel$", path):
        return 0  # row-parallel
    return None


def param_specs(params: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for the base parameters on ``mesh`` (see the module docstring).

    Example:
        >>> import jax
        >>> mesh = make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
        >>> _, params = gpt.init(Config(layers=1).model_config(), jax.random.key(0), abstract=True)
        >>> specs = param_specs(params, mesh)
        >>> specs["blocks_0"]["attn"]["query"]["kernel"]  # model on heads, fsdp on d_model
        P('fsdp', 'model', None)
        >>> specs["blocks_0"]["ffn_out"]["kernel"]
        P('model', 'fsdp')
    """

    def spec(keypath, x) -> PartitionSpec:
        entries: list[Any] = [None] * x.ndim
        path = path_str(keypath)
        if "model" in mesh.shape and (axis := _tp_axis(path, x.ndim)) is not None:
            if x.shape[axis] % mesh.shape["model"]:
                raise ValueError(f"{path} axis {axis} of {x.shape} does not split over "
                                 f"model={mesh.shape['model']}")
            entries[axis] = "model"
        if "fsdp" in mesh.shape and x.ndim >= 2:
            size = mesh.shape["fsdp"]
            free = [i for i in range(x.ndim) if entries[i] is None and x.shape[i] % size == 0]
            if free:
                entries[max(free, key=lambda i: x.shape[i])] = "fsdp"
        return PartitionSpec(*entries)

    return jax.tree_util.tree_map_with_path(spec, params)


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """The batch is split over every mesh axis but ``model``."""
    return PartitionSpec(tuple(name for name in mesh.axis_names if name != "model"), None)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """``lorax.optimizer`` over AdamW or SGD."""
    inner = optax.adamw(config.lr) if config.optimizer == "adamw" else optax.sgd(config.lr)
    return lorax.optimizer(inner)


def make_train_step(model: gpt.GPT, tx: optax.GradientTransformation,
                    axis_name: str | None = None) -> Callable:
    """``step(train, frozen, opt_state, tokens) -> (train, opt_state, loss)``.

    ``train``/``frozen`` are the halves of :func:`lorax.split`; only ``train`` is returned, so
    a jitted step never copies the frozen W. With ``axis_name`` (``pmap``/``shard_map``), the
    loss and the factor gradients are averaged over that axis with ``lax.pmean``.
    """

    @lorax.lora
    def loss_fn(params, tokens):  # next-token prediction: position t predicts token t + 1
        logits = model.apply({"params": params}, tokens)
        return gpt.next_token_loss(logits[:, :-1], tokens[:, 1:])

    def step(train, frozen, opt_state, tokens):
        loss, grads = lorax.value_and_grad(loss_fn)(lorax.combine(train, frozen), tokens)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    return step


def state_shardings(state: Any, param_sharding: Any, other: NamedSharding) -> Any:
    """Shardings for an optax state: subtrees shaped like the params get the params' shardings
    (Adam's ``mu``/``nu``, momentum), every other leaf (step counts) ``other``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.zeros(3)}
        >>> state = jax.eval_shape(optax.adam(0.1).init, params)
        >>> jax.tree.leaves(state_shardings(state, {"w": "P"}, "R"))  # count, mu, nu
        ['R', 'P', 'P']
    """
    target = jax.tree.structure(param_sharding)

    def shaped_like_params(x: Any) -> bool:
        return jax.tree.structure(x) == target

    return jax.tree.map(
        lambda x: param_sharding if shaped_like_params(x) else jax.tree.map(lambda _: other, x),
        state, is_leaf=shaped_like_params)


@dataclasses.dataclass
class Run:
    """A wrapped, sharded model ready to train."""

    model: gpt.GPT
    mesh: Mesh
    train: Any
    frozen: Any
    opt_state: Any
    step_fn: Callable
    batch_sharding: NamedSharding
    start: int = 0


def setup(config: Config, mesh: Mesh) -> Run:
    """Initialises the base model sharded on ``mesh``, wraps it and jits the train step.

    Example:
        >>> import jax
        >>> run = setup(Config(layers=1), make_mesh({"data": 1}, jax.devices()[:1]))
        >>> run.train["blocks_0"]["attn"]["query"]["kernel"].a.shape
        (64, 2)
    """
    model = gpt.GPT(config.model_config())
    tokens = jnp.zeros((config.batch_size, config.seq_len), jnp.int32)
    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(model.init, key, tokens)
    base_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s),
                                 {"params": param_specs(abstract["params"], mesh)})
    # Every process runs the same init; each materialises only its own shards. (A pretrained
    # base would be restored with orbax onto `base_sharding` instead.)
    params = jax.jit(model.init, out_shardings=base_sharding)(key, tokens)["params"]
    # W is committed and sharded, so lorax.wrap puts each factor on its derived sharding.
    wrapped = lorax.wrap(params, config.rank, targets=list(TARGETS), alpha=config.alpha,
                         key=jax.random.key(config.seed + 1))
    train, frozen = lorax.split(wrapped)
    tx = make_optimizer(config)
    train_sharding = jax.tree.map(lambda x: x.sharding, train)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sharding = state_shardings(jax.eval_shape(tx.init, train), train_sharding, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(train)
    batch_sharding = NamedSharding(mesh, batch_spec(mesh))
    step_fn = jax.jit(
        make_train_step(model, tx),
        in_shardings=(train_sharding, jax.tree.map(lambda x: x.sharding, frozen), opt_sharding,
                      batch_sharding),
        out_shardings=(train_sharding, opt_sharding, replicated),
        donate_argnums=(0, 2),
    )
    return Run(model, mesh, train, frozen, opt_state, step_fn, batch_sharding)


def global_batch(config: Config, step: int, sharding: NamedSharding) -> jax.Array:
    """The global batch of ``step`` as one array; this process builds only its own rows."""
    shape = (config.batch_size, config.seq_len)

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        return batch_rows(config, step, range(config.batch_size)[index[0]])[:, index[1]]

    return jax.make_array_from_callback(shape, sharding, rows)


def checksum(train: Any) -> float:
    """Sum of every factor (a cheap, replicated fingerprint of the adapters)."""
    return float(jax.jit(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(t)))(train))


def emit(event: str, **fields: Any) -> None:
    """Prints one machine-readable event line (``lorax-event {...}``)."""
    print(EVENT, json.dumps({"event": event, "process": jax.process_index(), **fields}),
          flush=True)


def train(config: Config, mesh: Mesh, ckpt_dir: str | None = None, *, save_every: int = 0,
          hold_at: int | None = None, log_every: int = 1) -> Any:
    """Trains ``config.steps`` steps (resuming from ``ckpt_dir``); returns the wrapped tree.

    Args:
        config: the run's settings.
        mesh: the global device mesh.
        ckpt_dir: where adapters and optimizer state are checkpointed (shared by all hosts);
            ``None`` disables checkpointing.
        save_every: save every N steps (the last step is always saved).
        hold_at: fault injection for tests: after the checkpoint of this step is complete,
            block until killed.
        log_every: print the loss every N steps (process 0).

    Example:
        >>> import jax
        >>> cfg = Config(layers=1, steps=2)
        >>> tree = train(cfg, make_mesh({"data": 1}, jax.devices()[:1]), log_every=0)
        lorax-event {"event": "start", "process": 0, "devices": 1, "processes": 1, ...}
        lorax-event {"event": "done", "process": 0, "step": 2, "checksum": ...}
        >>> tree["blocks_0"]["ffn_in"]["kernel"].b.shape
        (2, 256)
    """
    run = setup(config, mesh)
    manager = None
    if ckpt_dir is not None:
        manager = lorax.CheckpointManager(ckpt_dir, max_to_keep=3)
        if manager.latest_step() is not None:
            restored = manager.restore(lorax.combine(run.train, run.frozen),
                                       opt_state=run.opt_state)
            run.train = lorax.split(restored.tree)[0]
            run.opt_state, run.start = restored.opt_state, restored.step
    emit("start", devices=jax.device_count(), processes=jax.process_count(),
         restored=run.start if run.start else None)
    train_half, opt_state = run.train, run.opt_state
    for step in range(run.start, config.steps):
        tokens = global_batch(config, step, run.batch_sharding)
        train_half, opt_state, loss = run.step_fn(train_half, run.frozen, opt_state, tokens)
        done = step + 1
        if log_every and jax.process_index() == 0 and (done % log_every == 0):
            emit("step", step=done, loss=float(loss))
        if manager is not None and (done == config.steps or (save_every and
                                                              done % save_every == 0)):
            manager.save(done, lorax.combine(train_half, run.frozen), opt_state=opt_state)
            emit("saved", step=done)
            if hold_at == done:
                manager.wait_until_finished()
                emit("hold", step=done)
                while True:
                    time.sleep(1)
    if manager is not None:
        manager.close()
    emit("done", step=config.steps, checksum=checksum(train_half))
    return lorax.combine(train_half, run.frozen)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring for launch commands)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.train_distributed",
                                     description=__doc__.split("\n\n")[0])
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--coordinator", help="host:port of process 0's coordinator service")
    cluster.add_argument("--num-processes", type=int, default=1)
    cluster.add_argument("--process-id", type=int, default=0)
    cluster.add_argument("--auto", action="store_true",
                         help="let jax.distributed.initialize() detect TPU/SLURM/MPI clusters")
    cluster.add_argument("--heartbeat-timeout", type=int, default=100,
                         help="seconds before a silent process is declared dead")
    cluster.add_argument("--init-timeout", type=int, default=300)
    cluster.add_argument("--cpu-collectives", default="gloo",
                         help="CPU collectives implementation (CPU-only runs)")
    parser.add_argument("--mesh", default="data=-1", help="axis sizes, e.g. data=2,fsdp=4")
    parser.add_argument("--ckpt-dir", help="shared checkpoint directory (resumes from it)")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--hold-at", type=int, default=None,
                        help="fault injection: block after this step's checkpoint")
    parser.add_argument("--log-every", type=int, default=1)
    defaults = Config()
    for field in dataclasses.fields(Config):
        default = getattr(defaults, field.name)
        choices = ("adamw", "sgd") if field.name == "optimizer" else None
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(default),
                            default=default, choices=choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Initialises ``jax.distributed`` (multi-process runs) and trains."""
    args = build_parser().parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    # Must precede any computation (it configures the CPU client, a no-op on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.auto:
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout,
                                   initialization_timeout=args.init_timeout)
    elif args.num_processes > 1:
        if not args.coordinator:
            raise SystemExit("--coordinator host:port is required with --num-processes > 1")
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout,
            initialization_timeout=args.init_timeout,
        )
    mesh = make_mesh(parse_mesh(args.mesh))
    train(config, mesh, args.ckpt_dir, save_every=args.save_every, hold_at=args.hold_at,
          log_every=args.log_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lorax against qwix on an NNX model: :func:`lorax.wrap` of a module vs qwix's LoRA provider.

The model is :class:`experiments.nnx_transformer.Transformer` (blocks created with ``nnx.vmap``
and applied with ``nnx.scan``, causal ``nnx.MultiHeadAttention``, dropout, a BatchNorm MLP) in
training mode. Two wrapped copies of the same base model, every kernel adapted at the same rank
and alpha:

* ``lorax``: ``lorax.wrap(model, rank=r, alpha=alpha)``;
* ``qwix``: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=r,
  alpha=alpha), tokens, rngs=...)`` (:func:`qwix_wrap`): every ``nnx.Linear``, the
  attention's ``nnx.LinearGeneral`` q/k/v/out and the head; not the embedding (qwix adapts
  ``dot_general``/``einsum`` with a parameter operand, the lookup is a gather);

both trained by the same step (:func:`experiments.nnx_transformer.train_step`:
``nnx.value_and_grad`` with ``argnums=nnx.DiffState(0, nnx.LoRAParam)`` and
``nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam).update``), jitted as a pure
function of the model's and optimizer's ``nnx.state`` (``nnx.merge`` inside, the state donated,
as ``nnx.jit`` does without re-walking the graph on every call). ``frozen`` is the floor of any
adapter method: the base model's forward plus the gradient with respect to the embedded input
only (no weight gradient, no optimizer), as in the rest of the benchmark.

Per method: trainable parameters (asserted equal), XLA's FLOPs and bytes accessed of the
compiled step on the *unrolled* model (``TransformerConfig(unroll=True)``: XLA's cost model
counts a while loop's body once, so the scanned step's figures, also recorded as
``flops_scan_*``, cover about one layer), the scanned step's memory analysis (the program that
runs), wall time of the scanned steps interleaved (lorax, qwix, frozen, lorax, ...; median and
spread of the per-round ratios) and the seconds to trace and to trace + lower + compile the
scanned step (interleaved, caches cleared before each).

qwix 0.1.8 cannot wrap the model as it stands: during its initializing call it attaches one
unstacked ``nnx.Rngs`` (``qwix_rngs``) to every module, and ``nnx.scan`` over the stacked
blocks then fails (``IndexError`` in ``jax.lax.scan``'s length inference). :func:`qwix_wrap`
sets :attr:`~experiments.nnx_transformer.Transformer.scan_broadcast` so the scan passes that
``Rngs`` whole to every layer; qwix's factors then come out stacked, but every layer's ``a``
is drawn from the same key (same values in every layer; ``b`` is zero, so the function is the
base model's either way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import optax
from flax import nnx

import lorax
from experiments import nnx_transformer as nt
from experiments.bench.cost import Cost, abstract, compile_step
from experiments.bench.timing import copy_tree, interleaved_wall

METHODS = ("lorax", "qwix", "frozen")
"""The timed steps: the two LoRA implementations and the frozen floor."""

ADAPTERS = ("lorax", "qwix")

FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""The base model's parameters (``nnx.LoRAParam`` is a subclass of ``nnx.Param``)."""

ALPHA = 8.0
"""LoRA alpha of both methods (lorax's default; scale ``alpha / rank``)."""

LEARNING_RATE = 1e-3

BATCH = 8
"""Sequences per batch (of ``max_len`` tokens)."""

QUICK_CONFIG = nt.TransformerConfig()
"""The tiny model of ``--quick`` and the tests."""

QUICK_BATCH = 2

QWIX_DEPRECATION = {"category": DeprecationWarning, "module": "qwix"}
"""``warnings.filterwarnings`` arguments for the deprecation warnings that qwix 0.1.8 triggers
in flax 0.12.8 (its ``model.iter_modules()`` and ``nnx.VariableState``, the latter on every
traced call of a wrapped model): qwix's to fix, ignored by :func:`quiet_qwix`."""


@contextlib.contextmanager
def quiet_qwix() -> Iterator[None]:
    """Ignores :data:`QWIX_DEPRECATION` inside the block (restoring the filters after it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", **QWIX_DEPRECATION)
        yield


def qwix_wrap(model: nt.Transformer, rank: int, tokens: jax.Array, alpha: float = ALPHA,
              seed: int = 0) -> nt.Transformer:
    """qwix's LoRA on every kernel of ``model`` (a new module; ``model`` is untouched).

    ``module_path=".*"`` matches every module; qwix adapts each ``dot_general``/``einsum`` whose
    right operand is a parameter of the calling module. qwix runs the model once on
    ``tokens`` to create the factors, hence :attr:`~nt.Transformer.scan_broadcast` (see the
    module docstring); it runs it in evaluation mode, because in training mode that call
    would update the BatchNorm statistics (and advance the dropout keys) of the copy, so the
    wrapped model would no longer compute the base model's function. The copy gets
    ``model``'s mode back afterwards. (No doctest: qwix is optional; ``tests/test_nnx_qwix.py``
    checks the factors' shapes and paths.)
    """
    import qwix

    training = not model.blocks.mlp_norm.use_running_average
    model = nnx.clone(model)
    model.scan_broadcast = ("qwix_rngs",)
    model.eval()  # qwix's initializing call would update the batch statistics otherwise
    provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha)
    with quiet_qwix():
        wrapped = qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(seed))
    if training:
        wrapped.train()
    return wrapped


def qwix_version() -> str:
    """The installed qwix distribution's version (recorded in every row)."""
    from importlib import metadata

    return metadata.version("qwix")


def lorax_wrap(model: nt.Transformer, rank: int, alpha: float = ALPHA) -> nt.Transformer:
    """``lorax.wrap(model, rank=rank, alpha=alpha)``: every kernel adapted, the embedding not."""
    return lorax.wrap(model, rank=rank, alpha=alpha)


def trainable_count(model: nnx.Module) -> int:
    """Elements of every ``nnx.LoRAParam`` of ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def train_fn(model: nnx.Module, learning_rate: float = LEARNING_RATE
             ) -> tuple[Callable[..., Any], Any]:
    """The pure LoRA training step of ``model`` and its initial state.

    Returns:
        ``(step, state)``: ``step(state, tokens) -> (state, loss)`` runs
        :func:`nt.train_step` with ``wrt=nnx.LoRAParam`` on ``nnx.merge(graphdef, state)``;
        ``state`` is ``nnx.state((model, optimizer))`` of a new ``nnx.Optimizer`` over Adam.
    """
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.LoRAParam)
    graphdef, state = nnx.split((model, optimizer))

    def step(state: Any, tokens: jax.Array) -> tuple[Any, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        loss = nt.train_step(model, optimizer, tokens, nnx.LoRAParam)
        return nnx.state((model, optimizer)), loss

    return step, state


def frozen_fn(model: nt.Transformer) -> tuple[Callable[..., Any], Any]:
    """The floor step of ``model``: loss and its gradient with respect to the embedded input.

    Returns:
        ``(step, state)``: ``step(state, tokens) -> (state, loss, d loss / d embedded)``
        (``state`` carries the BatchNorm statistics and the dropout keys).
    """
    graphdef, state = nnx.split(model)

    def step(state: Any, tokens: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def loss(h: jax.Array, model: nt.Transformer) -> jax.Array:
            logits = model.logits(h)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        value, grad = nnx.value_and_grad(loss)(model.embed_tokens(inputs), model)
        return nnx.state(model), value, grad

    return step, state


def build(config: nt.TransformerConfig, rank: int, batch_size: int, seed: int = 0
          ) -> tuple[dict[str, nnx.Module], jax.Array]:
    """The base model (training mode) and both wrapped copies, and one batch of tokens.

    Returns:
        ``({"lorax": ..., "qwix": ..., "frozen": base}, tokens)``.
    """
    model = nt.Transformer(config, rngs=nnx.Rngs(seed))
    model.train()
    tokens = nt.random_tokens(config, jax.random.key(seed + 1), batch_size)
    models = {"lorax": lorax_wrap(model, rank), "qwix": qwix_wrap(model, rank, tokens),
              "frozen": model}
    return models, tokens


def steps_of(models: dict[str, nnx.Module]) -> dict[str, tuple[Callable[..., Any], Any]]:
    """``{method: (pure step, state)}`` of :func:`build`'s models."""
    return {name: (frozen_fn(m) if name == "frozen" else train_fn(m))
            for name, m in models.items()}


def compile_all(steps: dict[str, tuple[Callable[..., Any], Any]], tokens: jax.Array,
                fast: bool = False) -> tuple[dict[str, Any], dict[str, Cost]]:
    """Compiles each step on abstract arguments (the state donated)."""
    compiled, costs = {}, {}
    for name, (fn, state) in steps.items():
        with quiet_qwix():
            compiled[name], costs[name] = compile_step(fn, abstract(state), tokens,
                                                       donate_argnums=(0,), fast=fast)
    return compiled, costs


def _spread(values: Sequence[float], key: str) -> dict[str, float]:
    return {key: statistics.median(values), f"{key}_min": min(values),
            f"{key}_max": max(values)}


def ratios(times: dict[str, list[float]], what: str) -> dict[str, float]:
    """Median, min and max of the per-round (or per-repetition) ratios ``lorax/qwix``,
    ``lorax/frozen`` and ``qwix/frozen`` of ``times`` (methods present), keyed
    ``{a}_over_{b}_{what}``.

    Example:
        >>> out = ratios({"lorax": [1.0, 3.0], "qwix": [2.0, 2.0]}, "wall")
        >>> out["lorax_over_qwix_wall"], out["lorax_over_qwix_wall_max"]
        (1.0, 1.5)
    """
    out: dict[str, float] = {}
    for a, b in (("lorax", "qwix"), ("lorax", "frozen"), ("qwix", "frozen")):
        if a in times and b in times:
            values = [x / y for x, y in zip(times[a], times[b], strict=True)]
            out.update(_spread(values, f"{a}_over_{b}_{what}"))
    return out


def time_compile(steps: dict[str, tuple[Callable[..., Any], Any]], tokens: jax.Array,
                 reps: int) -> dict[str, dict[str, list[float]]]:
    """Trace (CPU s of the tracing thread) and trace + lower + compile (wall s) times of each
    step, ``reps`` interleaved repetitions, caches cleared before each.

    Returns:
        ``{"trace": {method: [s, ...]}, "compile": {method: [s, ...]}}``.
    """
    times: dict[str, dict[str, list[float]]] = {"trace": {}, "compile": {}}
    for _ in range(reps):
        for name, (fn, state) in steps.items():
            args = (abstract(state), tokens)
            jax.clear_caches()
            wall, cpu = time.perf_counter(), time.thread_time()
            with quiet_qwix():
                traced = jax.jit(fn, donate_argnums=(0,)).trace(*args)
            times["trace"].setdefault(name, []).append(time.thread_time() - cpu)
            traced.lower().compile()
            times["compile"].setdefault(name, []).append(time.perf_counter() - wall)
    return times


def time_wall(steps: dict[str, tuple[Callable[..., Any], Any]], compiled: dict[str, Any],
              tokens: jax.Array, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Runs the compiled steps round-robin; seconds per step of each."""
    states = {name: copy_tree(state) for name, (_, state) in steps.items()}

    def runner(name: str) -> Callable[[], Any]:
        def run() -> Any:
            out = compiled[name](states[name], tokens)
            states[name] = out[0]
            return out
        return run

    return interleaved_wall({name: runner(name) for name in steps}, rounds, warmup)


def step_zero_outputs(models: dict[str, nnx.Module], tokens: jax.Array) -> dict[str, jax.Array]:
    """Logits of each model in evaluation mode (deterministic; no state changes), on copies."""
    out = {}
    for name, model in models.items():
        model = nnx.clone(model)
        model.eval()
        with quiet_qwix():
            out[name] = model(tokens)
    return out


def compare(config: nt.TransformerConfig, rank: int = 8, batch_size: int = BATCH,
            rounds: int = 10, warmup: int = 2, compile_reps: int = 2, fast: bool = False,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every measurement of the lorax/qwix comparison at ``rank``; a JSON-ready row.

    Args:
        config: The model's shapes (``unroll`` is set per measurement).
        rank: The LoRA rank of both methods.
        batch_size: Sequences per batch.
        rounds: Timed wall-time rounds.
        warmup: Untimed rounds first.
        compile_reps: Interleaved compile-time repetitions (0: not measured).
        fast: Compile the cost-only (unrolled) programs with
            :data:`~experiments.bench.cost.FAST_COMPILE`.
        progress: Called with a label before each stage.

    Raises:
        AssertionError: When the two methods train different numbers of parameters.
    """
    row: dict[str, Any] = {"model": "nnx", "rank": rank, "alpha": ALPHA, "qwix": qwix_version(),
                           "shapes": {**dataclasses.asdict(config), "batch": batch_size},
                           "tokens": batch_size * (config.max_len - 1)}
    progress(f"nnx r={rank}: cost (unrolled)")
    models, tokens = build(dataclasses.replace(config, unroll=True), rank, batch_size)
    counts = {name: trainable_count(models[name]) for name in ADAPTERS}
    assert counts["lorax"] == counts["qwix"], f"trainable parameters differ: {counts}"
    row["trainable_params"] = counts["lorax"]
    row["total_params"] = sum(x.size for x in jax.tree.leaves(nnx.state(models["frozen"],
                                                                          nnx.Param)))
    _, costs = compile_all(steps_of(models), tokens, fast=fast)
    for name, cost in costs.items():
        row[f"flops_{name}"] = cost.flops
        row[f"bytes_accessed_{name}"] = cost.bytes_accessed
    progress(f"nnx r={rank}: compile (scan) and wall ({rounds} rounds)")
    models, tokens = build(dataclasses.replace(config, unroll=False), rank, batch_size)
    steps = steps_of(models)
    compiled, costs = compile_all(steps, tokens)
    for name, cost in costs.items():
        row[f"flops_scan_{name}"] = cost.flops
        row[f"temp_bytes_{name}"] = cost.temp_bytes
        row[f"argument_bytes_{name}"] = cost.argument_bytes
        row[f"peak_bytes_{name}"] = cost.peak_bytes
    wall = time_wall(steps, compiled, tokens, rounds, warmup)
    row.update({f"ms_{name}": 1e3 * statistics.median(t) for name, t in wall.items()})
    row.update(ratios(wall, "wall"))
    row["wall_steps"] = rounds
    for a, b in (("lorax", "qwix"), ("lorax", "frozen"), ("qwix", "frozen")):
        row[f"{a}_over_{b}_flops"] = row[f"flops_{a}"] / row[f"flops_{b}"]
        row[f"{a}_over_{b}_bytes_accessed"] = (row[f"bytes_accessed_{a}"]
                                               / row[f"bytes_accessed_{b}"])
    if compile_reps:
        progress(f"nnx r={rank}: compile time ({compile_reps} reps)")
        times = time_compile(steps, tokens, compile_reps)
        for what, per in times.items():
            row.update({f"{what}_s_{name}": statistics.median(t) for name, t in per.items()})
            row.update(ratios(per, what))
        row["compile_reps"] = compile_reps
    return row


def run(ranks: Sequence[int], quick: bool, rounds: int, warmup: int,
        progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """:func:`compare` at each rank: the tiny model with ``quick`` (one compile repetition,
    cost-only programs compiled fast), else :data:`nt.BENCH_CONFIG` at batch :data:`BATCH`."""
    config, batch = (QUICK_CONFIG, QUICK_BATCH) if quick else (nt.BENCH_CONFIG, BATCH)
    return [compare(config, rank, batch, rounds, warmup, 1 if quick else 2, fast=quick,
                    progress=progress) for rank in ranks]


def render(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's markdown lines for :func:`run`'s rows."""
    from experiments.bench.footprint import fmt_bytes
    from experiments.bench.report import _table, fmt_count

    def spread(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return "-"
        return f"{row[key]:.2f} ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"

    lines = ["## NNX: lorax.wrap vs qwix LoRA (same model, same nnx step)", "",
             "`experiments/nnx_transformer.py` (nnx.vmap-stacked blocks under nnx.scan, "
             "BatchNorm, dropout) in training mode, every kernel at rank r, "
             "`nnx.Optimizer(wrt=nnx.LoRAParam)` over Adam. FLOPs/bytes: XLA cost analysis "
             "of the unrolled step; peak: memory analysis of the scanned step; wall: median "
             "of per-round ratios (min-max), lorax, qwix and frozen steps interleaved; "
             "compile: trace + lower + compile, caches cleared, interleaved.", ""]
    lines += _table(
        ["r", "trainable", "GFLOP lorax / qwix / frozen", "lorax/qwix FLOPs",
         "lorax/qwix bytes", "lorax/frozen FLOPs", "peak lorax / qwix / frozen",
         "lorax/qwix wall", "lorax/frozen wall", "ms lorax / qwix / frozen",
         "compile s lorax / qwix", "trace s lorax / qwix"],
        [[r["rank"], fmt_count(r["trainable_params"]),
          " / ".join(f"{r[f'flops_{m}'] / 1e9:.3f}" for m in METHODS),
          f"{r['lorax_over_qwix_flops']:.3f}", f"{r['lorax_over_qwix_bytes_accessed']:.3f}",
          f"{r['lorax_over_frozen_flops']:.3f}",
          " / ".join(fmt_bytes(r[f"peak_bytes_{m}"]) for m in METHODS),
          spread(r, "lorax_over_qwix_wall"), spread(r, "lorax_over_frozen_wall"),
          " / ".join(f"{r[f'ms_{m}']:.1f}" for m in METHODS),
          " / ".join(f"{r[f'compile_s_{m}']:.2f}" if f"compile_s_{m}" in r else "-"
                     for m in ADAPTERS),
          " / ".join(f"{r[f'trace_s_{m}']:.2f}" if f"trace_s_{m}" in r else "-"
                     for m in ADAPTERS)]
         for r in rows],
    )
    return lines

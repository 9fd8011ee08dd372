"""Benchmark: what a LoRA step costs against full fine-tuning and the frozen model.

Run ``python -m experiments.bench`` (``--quick`` for a tiny smoke run, ``--help`` for flags). For
each model (a GPT-style decoder, :mod:`experiments.gpt`, and the pretrained MiniLM encoder,
:mod:`experiments.bert`, with a regression head) and each rank it measures, in one process:

1. **FLOPs and bytes** from XLA's cost model of the compiled step (deterministic: they depend on
   shapes only):

   * ``lora``: ``value_and_grad`` of the :func:`lorax.lora`-transformed loss with respect to the
     trainable half of :func:`lorax.split`, :func:`lorax.optimizer` over ``optax.adam`` and
     ``optax.apply_updates``;
   * ``full``: the same loss differentiated with respect to every parameter, ``optax.adam`` on
     everything;
   * ``frozen``: the physical floor of any adapter method, a forward pass plus the gradient with
     respect to the *embedded input* only (the float activations after the embedding lookup; the
     models are split into ``embed`` and ``body``). No weight gradient and no optimizer. This
     floor back-propagates one layer further than LoRA needs (into the first layer's input), so
     ``lora_over_frozen_flops`` can sit slightly below ``1 +`` the low-rank share;
   * ``merged`` vs ``base`` forward: :func:`lorax.merge` params through the unmodified model
     against the original params (identical shapes, hence identical programs: ratio 1.0), and the
     unmerged factorized forward (``lora_forward_over_base_flops``) for context.

   Ratios: ``lora_over_full_flops`` (floor about 2/3: forward + input gradient, no weight
   gradient), ``lora_over_frozen_flops`` (target <= 1.03), ``merged_over_base_flops`` (1.0).
2. **Wall time**: LoRA, full and frozen steps interleaved in one process (L F Z L F Z ...,
   ``block_until_ready``) after warm-up; ``lora_over_full_wall`` is the median of the per-round
   ratios, with their min and max. Absolute milliseconds are context only.
3. **Memory**: Adam state bytes (LoRA vs full), XLA's temp bytes of each compiled step, peak RSS of
   a LoRA and of a full training run each in its own subprocess (``--_worker``; Linux
   ``VmHWM``, see :func:`peak_rss_bytes`; ``init`` is a worker that only builds the model), and
   the bytes on disk of an orbax checkpoint of the adapter (the trainable half) vs the full
   params.
4. **Scale planning**: ``jax.eval_shape`` of :func:`lorax.wrap` plus the optimizer's ``init`` on
   Llama-2-7B- and 70B-shaped bf16 trees (``q,k,v,o`` and all linear layers at r = 8): trainable
   parameters, adapter and Adam-state bytes, and the wall time of the abstract wrap.
5. **Rank scaling**: LoRA-step FLOPs of the GPT for r = 1, 2, 4, ..., 256 against the frozen floor.
6. **Step memory by base** (:mod:`experiments.memory`): XLA's argument, temp, output and peak
   bytes of the gradient programs of full fine-tuning, the frozen floor and LoRA on float32,
   bfloat16, nf4 and int8 frozen kernels, for a weight-dominated GPT
   (:data:`experiments.memory.MEMORY_GPT`) at batch 1 and 16 (``--quick``: the tiny GPT at
   batch 1 and 2).

``--quick`` shrinks everything for a smoke run: a tiny GPT (and, when asked for with
``--models``, a tiny random-init MiniLM-shaped encoder), 3 timed rounds, no RSS subprocesses,
rank sweep 1, 8, 64, and every program compiled with :data:`FAST_COMPILE` (FLOP counts are
unchanged).

Outputs: the markdown report on stdout (``--json``: the JSON instead), and in ``--out DIR``:
``bench.md``, ``bench.json`` (a list with one object per model and rank) and
``bench_scale.json`` (scale planning, rank scaling and the step-memory table). Machine
information is recorded in all three.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lorax
from experiments import gpt

MODELS = ("gpt", "minilm")
"""Every model name ``--models`` accepts."""

RANK_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Ranks of the rank-scaling sweep (capped at the model's largest valid rank)."""

QUICK_SWEEP = (1, 8, 64)
"""Ranks of the sweep with ``--quick``."""

SCALE_RANK = 8
"""Rank of the scale-planning runs."""

LEARNING_RATE = 1e-3

WORKER_KINDS = ("init", "lora", "full")
"""What a ``--_worker`` subprocess does: build the model only, or also train (LoRA or full)."""

RSS_STEPS = 3
"""Training steps of a ``--_worker`` run (after one warm-up step); peak memory is reached in
the first."""

QUICK_GPT = gpt.GPTConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=512,
                          max_len=32)
QUICK_BATCH = 2


# --------------------------------------------------------------------------------------------
# Workloads: a model split into embed + body, its params and one batch.


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to benchmark, as pure functions of ``(params, batch)``.

    Attributes:
        name: The model name (``"gpt"`` or ``"minilm"``).
        params: The plain parameter tree (float32).
        batch: One training batch (a tuple of arrays).
        embed: ``(params, batch) -> h``, the float activations after the embedding lookup.
        body_loss: ``(params, h, batch) -> loss``, everything after the embedding.
        forward: ``(params, batch) -> outputs``, the inference forward pass.
        wrap_kwargs: Extra keyword arguments of :func:`lorax.wrap` (e.g. a ``train`` head).
        shapes: A description of the shapes, recorded in the results.
        config: The model's config (:class:`experiments.gpt.GPTConfig` or
            :class:`experiments.bert.BertConfig`).
    """

    name: str
    params: Any
    batch: tuple[Any, ...]
    embed: Callable[[Any, tuple[Any, ...]], jax.Array]
    body_loss: Callable[[Any, jax.Array, tuple[Any, ...]], jax.Array]
    forward: Callable[[Any, tuple[Any, ...]], Any]
    wrap_kwargs: dict[str, Any]
    shapes: dict[str, Any]
    config: Any = None

    def loss(self, params: Any, batch: tuple[Any, ...]) -> jax.Array:
        """The training loss, ``body_loss(params, embed(params, batch), batch)``."""
        return self.body_loss(params, self.embed(params, batch), batch)

    def wrap(self, rank: int) -> Any:
        """``lorax.wrap(params, rank, **wrap_kwargs)``: every kernel adapted at ``rank``."""
        return lorax.wrap(self.params, rank, **self.wrap_kwargs)


def gpt_workload(
    config: gpt.GPTConfig = gpt.GPTConfig(),  # noqa: B008
    batch_size: int = 8,
    seed: int = 0,
    abstract_params: bool = False,
) -> Workload:
    """The GPT decoder on a random next-token batch of ``(batch_size, config.max_len)``.

    Every kernel is adapted, the vocabulary head included; embeddings stay frozen.

    Args:
        config: The model's shapes.
        batch_size: Sequences per batch.
        seed: Seed of the parameters and the batch.
        abstract_params: ``jax.ShapeDtypeStruct`` params: enough for FLOP counts
            (:func:`measure_flops`), not for running steps.

    Example:
        >>> w = gpt_workload(batch_size=2, abstract_params=True)
        >>> jax.eval_shape(w.embed, w.params, w.batch).shape
        (2, 128, 512)
    """
    init_key, data_key = jax.random.split(jax.random.key(seed))
    model, params = gpt.init(config, init_key, abstract=abstract_params)
    batch = gpt.random_batch(config, data_key, batch_size)

    def embed(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return model.apply({"params": params}, batch[0], method="embed")

    def body_loss(params: Any, h: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        logits = model.apply({"params": params}, h, method="decode")
        return gpt.next_token_loss(logits, batch[1])

    def forward(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return model.apply({"params": params}, batch[0])

    shapes = {**dataclasses.asdict(config), "batch": batch_size, "seq": config.max_len}
    return Workload("gpt", params, batch, embed, body_loss, forward, {}, shapes, config)


def minilm_workload(
    batch_size: int = 8, seq_len: int = 128, config: Any = None, seed: int = 0
) -> Workload:
    """The pretrained all-MiniLM-L6-v2 encoder with a fresh regression head on the mean pool.

    The head (``head/kernel`` ``(d, 1)`` and ``head/bias``) is new, so it is trained in full
    (``train="^head/"``); every encoder kernel is adapted. The loss is the mean squared error
    against random targets on a random batch of ``(batch_size, seq_len)`` token ids.

    Args:
        batch_size: Sentences per batch.
        seq_len: Tokens per sentence.
        config: A :class:`experiments.bert.BertConfig` for a randomly initialised encoder (tests,
            ``--quick``); ``None`` loads the pretrained weights.
        seed: Seed of the head, the data and (with ``config``) the encoder.

    Returns:
        The workload; its ``params`` are ``{"bert": <BertModel params>, "head": {...}}``.
    """
    import flax.linen as nn

    from experiments import bert, hf_bert

    keys = jax.random.split(jax.random.key(seed), 4)
    pretrained = config is None
    if pretrained:
        model, bert_params, _ = hf_bert.load_pretrained(max_length=seq_len)
        config = model.config
    else:
        ids = jnp.zeros((1, seq_len), jnp.int32)
        bert_params = jax.jit(bert.BertModel(config).init)(keys[0], ids, ids)["params"]
    head = nn.Dense(1, name="head")
    head_params = head.init(keys[1], jnp.zeros((1, config.hidden_size)))["params"]
    params = {"bert": bert_params, "head": head_params}
    input_ids = jax.random.randint(keys[2], (batch_size, seq_len), 0, config.vocab_size, jnp.int32)
    mask = jnp.ones((batch_size, seq_len), jnp.int32)
    targets = jax.random.normal(keys[3], (batch_size,), jnp.float32)
    batch = (input_ids, mask, targets)
    embeddings, encoder = bert.BertEmbeddings(config), bert.BertEncoder(config)

    def embed(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        ids = batch[0]
        return embeddings.apply(
            {"params": params["bert"]["embeddings"]}, ids, jnp.zeros_like(ids), True
        )

    def predict(params: Any, h: jax.Array, mask: jax.Array) -> jax.Array:
        key_mask = nn.make_attention_mask(jnp.ones_like(mask), mask, dtype=jnp.bool_)
        hidden = encoder.apply({"params": params["bert"]["encoder"]}, h, key_mask, True)
        pooled = bert.mean_pool(hidden, mask)
        return head.apply({"params": params["head"]}, pooled)[:, 0]

    def body_loss(params: Any, h: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        return jnp.mean((predict(params, h, batch[1]) - batch[2]) ** 2)

    def forward(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return predict(params, embed(params, batch), batch[1])

    shapes = {
        "d_model": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "d_ff": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "batch": batch_size,
        "seq": seq_len,
        "pretrained": pretrained,
    }
    return Workload("minilm", params, batch, embed, body_loss, forward,
                    {"train": "^head/"}, shapes, config)


def make_workload(name: str, quick: bool = False) -> Workload:
    """The benchmark's workload ``name`` at full size, or tiny with ``quick``.

    Args:
        name: One of :data:`MODELS`.
        quick: Tiny shapes (random-init MiniLM-shaped encoder, tiny GPT) for smoke runs.

    Returns:
        The workload.

    Raises:
        ValueError: For an unknown name.
    """
    if name == "gpt":
        return gpt_workload(QUICK_GPT, QUICK_BATCH) if quick else gpt_workload()
    if name == "minilm":
        if not quick:
            return minilm_workload()
        from experiments import bert

        tiny = bert.BertConfig(vocab_size=512, hidden_size=96, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=384,
                               max_position_embeddings=32)
        return minilm_workload(QUICK_BATCH, 32, tiny)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


# --------------------------------------------------------------------------------------------
# The steps: LoRA, full fine-tuning, the frozen floor, and forward passes.


@dataclasses.dataclass(frozen=True)
class Steps:
    """The pure step functions of one workload (jit them; none is jitted here).

    Attributes:
        lora: ``(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.
        full: ``(params, opt_state, batch) -> (params, opt_state, loss)``.
        frozen: ``(params, batch) -> (loss, d loss / d embedded input)``.
        forward: ``(params, batch) -> outputs`` of the plain model (base or merged params).
        lora_forward: ``(wrapped params, batch) -> outputs``, factorized, unmerged.
        tx_lora: ``lorax.optimizer(optax.adam(...))``.
        tx_full: ``optax.adam(...)``.
    """

    lora: Callable[..., Any]
    full: Callable[..., Any]
    frozen: Callable[..., Any]
    forward: Callable[..., Any]
    lora_forward: Callable[..., Any]
    tx_lora: optax.GradientTransformation
    tx_full: optax.GradientTransformation


def make_steps(workload: Workload, learning_rate: float = LEARNING_RATE) -> Steps:
    """Builds the benchmark's step functions for ``workload``."""
    tx_lora = lorax.optimizer(optax.adam(learning_rate))
    tx_full = optax.adam(learning_rate)
    lora_loss = lorax.lora(workload.loss)

    def lora_step(trainable: Any, frozen: Any, opt_state: Any, batch: tuple[Any, ...]):
        def loss_fn(t: Any) -> jax.Array:
            return lora_loss(lorax.combine(t, frozen), batch)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx_lora.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def full_step(params: Any, opt_state: Any, batch: tuple[Any, ...]):
        loss, grads = jax.value_and_grad(workload.loss)(params, batch)
        updates, opt_state = tx_full.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def frozen_step(params: Any, batch: tuple[Any, ...]):
        h = workload.embed(params, batch)
        return jax.value_and_grad(lambda h: workload.body_loss(params, h, batch))(h)

    return Steps(lora_step, full_step, frozen_step, workload.forward,
                 lorax.lora(workload.forward), tx_lora, tx_full)


@dataclasses.dataclass(frozen=True)
class Cost:
    """XLA's cost and memory analysis of one compiled program.

    Attributes:
        flops: ``cost_analysis()["flops"]``.
        bytes_accessed: ``cost_analysis()["bytes accessed"]``.
        temp_bytes: ``memory_analysis().temp_size_in_bytes`` (scratch, activations).
        argument_bytes: ``memory_analysis().argument_size_in_bytes``.
        output_bytes: ``memory_analysis().output_size_in_bytes``.
        alias_bytes: ``memory_analysis().alias_size_in_bytes`` (donated outputs).
    """

    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA options of cost-only compiles: LLVM code generation unoptimized (about twice as fast to
compile). The HLO passes, hence XLA's cost and memory analysis, are unchanged."""


def compile_step(
    fn: Callable[..., Any], *args: Any, donate_argnums: Sequence[int] = (), fast: bool = False
) -> tuple[Any, Cost]:
    """Jits, lowers and compiles ``fn`` for ``args``; returns the executable and its :class:`Cost`.

    ``args`` may be concrete or ``jax.ShapeDtypeStruct`` trees (only shapes matter). A
    :class:`lorax.LoRAFallbackWarning` while tracing is raised as an error: the benchmark
    measures factorized compute and must not silently measure a materialized ``W + s·A·B``.

    Args:
        fn: The step function.
        *args: Its arguments.
        donate_argnums: Arguments whose buffers the step may reuse (as a training loop does).
        fast: Compile with :data:`FAST_COMPILE` (for programs that are measured, never run).

    Example:
        >>> _, cost = compile_step(lambda x: x @ x, jnp.ones((4, 4)), fast=True)
        >>> cost.flops
        128.0
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoRAFallbackWarning)
        lowered = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args)
    compiled = lowered.compile(compiler_options=FAST_COMPILE if fast else None)
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per partition
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return compiled, Cost(
        flops=float(analysis["flops"]),
        bytes_accessed=float(analysis["bytes accessed"]),
        temp_bytes=int(memory.temp_size_in_bytes),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (concrete or ``jax.ShapeDtypeStruct``).

    Example:
        >>> tree_bytes({"a": jnp.zeros((2, 3)), "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
        32
    """
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def factor_bytes(tree: Any) -> int:
    """Bytes of the LoRA factors ``a`` and ``b`` of a wrapped tree (``train`` leaves excluded).

    Example:
        >>> factor_bytes(lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2))  # (8*2 + 2*4) * 4
        96
    """
    nodes = [n for n in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    return tree_bytes([(n.a, n.b) for n in nodes])


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree`` in new buffers (so one of the two may be donated)."""
    return jax.tree.map(jnp.copy, tree)


def lora_cost(workload: Workload, steps: Steps, rank: int, fast: bool = False):
    """Compiles the LoRA step at ``rank`` on abstract arguments (trainable half and optimizer
    state donated); returns ``(executable, Cost)``."""
    trainable, frozen = lorax.split(lorax.wrap(abstract(workload.params), rank,
                                               **workload.wrap_kwargs))
    opt_state = jax.eval_shape(steps.tx_lora.init, trainable)
    return compile_step(steps.lora, trainable, frozen, opt_state, workload.batch,
                        donate_argnums=(0, 2), fast=fast)


def base_costs(
    workload: Workload, steps: Steps, fast: bool = False
) -> tuple[dict[str, Any], dict[str, Cost]]:
    """Compiles the rank-independent programs ``full``, ``frozen`` and ``base_forward``.

    Args:
        workload: The model.
        steps: Its step functions.
        fast: Compile the steps with :data:`FAST_COMPILE` too (the forward always is: it is
            measured, never run).

    Returns:
        ``({name: executable}, {name: Cost})``.
    """
    params, batch = abstract(workload.params), workload.batch
    compiled, costs = {}, {}
    compiled["full"], costs["full"] = compile_step(
        steps.full, params, jax.eval_shape(steps.tx_full.init, params), batch,
        donate_argnums=(0, 1), fast=fast,
    )
    compiled["frozen"], costs["frozen"] = compile_step(steps.frozen, params, batch, fast=fast)
    compiled["base_forward"], costs["base_forward"] = compile_step(
        steps.forward, params, batch, fast=True
    )
    return compiled, costs


def rank_costs(
    workload: Workload, steps: Steps, rank: int, fast: bool = False
) -> tuple[dict[str, Any], dict]:
    """Compiles the rank-dependent programs ``lora``, ``merged_forward`` and ``lora_forward``.

    ``merged_forward`` runs :func:`lorax.merge`'s output through the plain model; the merge
    itself is not part of it (it happens once, before serving).
    """
    lp = lorax.wrap(abstract(workload.params), rank, **workload.wrap_kwargs)
    compiled, costs = {}, {}
    compiled["lora"], costs["lora"] = lora_cost(workload, steps, rank, fast=fast)
    compiled["merged_forward"], costs["merged_forward"] = compile_step(
        steps.forward, jax.eval_shape(lorax.merge, lp), workload.batch, fast=True
    )
    compiled["lora_forward"], costs["lora_forward"] = compile_step(
        steps.lora_forward, lp, workload.batch, fast=True
    )
    return compiled, costs


def flop_ratios(costs: dict[str, Cost]) -> dict[str, float]:
    """The benchmark's FLOP (and bytes-accessed) ratios from the programs' :class:`Cost`.

    Args:
        costs: ``{"lora", "full", "frozen", "base_forward", "merged_forward",
            "lora_forward"}`` costs.

    Returns:
        ``lora_over_full_flops``, ``lora_over_frozen_flops``, ``merged_over_base_flops``,
        ``lora_forward_over_base_flops``, ``full_over_frozen_flops`` and
        ``lora_over_full_bytes_accessed``.
    """
    def ratio(a: str, b: str, attr: str = "flops") -> float:
        return getattr(costs[a], attr) / getattr(costs[b], attr)

    return {
        "lora_over_full_flops": ratio("lora", "full"),
        "lora_over_frozen_flops": ratio("lora", "frozen"),
        "merged_over_base_flops": ratio("merged_forward", "base_forward"),
        "lora_forward_over_base_flops": ratio("lora_forward", "base_forward"),
        "full_over_frozen_flops": ratio("full", "frozen"),
        "lora_over_full_bytes_accessed": ratio("lora", "full", "bytes_accessed"),
    }


def measure_flops(workload: Workload, rank: int) -> dict[str, Cost]:
    """Compiles all six programs of ``workload`` at ``rank`` and returns their costs.

    The benchmark itself compiles the rank-independent programs once per model
    (:func:`base_costs`) and the others once per rank (:func:`rank_costs`); this is both.
    """
    steps = make_steps(workload)
    _, costs = base_costs(workload, steps, fast=True)
    _, more = rank_costs(workload, steps, rank, fast=True)
    return {**costs, **more}


# --------------------------------------------------------------------------------------------
# Wall time


def interleaved_wall(
    runners: dict[str, Callable[[], Any]], steps: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Times the runners round-robin (A B C A B C ...) and returns seconds per step of each.

    Each runner performs one step and returns its outputs; the timer stops after
    ``jax.block_until_ready`` on them. ``warmup`` rounds run first and are not recorded.

    Example:
        >>> times = interleaved_wall({"a": lambda: jnp.ones(2), "b": lambda: jnp.zeros(2)}, 3, 1)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def wall_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Per-round LoRA/full and LoRA/frozen ratios (median, min, max) and median milliseconds.

    Example:
        >>> out = wall_summary({"lora": [1.0, 2.0], "full": [2.0, 2.0], "frozen": [1.0, 1.0]})
        >>> out["lora_over_full_wall"], out["lora_over_full_wall_min"], out["ms_full"]
        (0.75, 0.5, 2000.0)
    """
    over_full = [a / b for a, b in zip(times["lora"], times["full"], strict=True)]
    over_frozen = [a / b for a, b in zip(times["lora"], times["frozen"], strict=True)]
    return {
        "lora_over_full_wall": statistics.median(over_full),
        "lora_over_full_wall_min": min(over_full),
        "lora_over_full_wall_max": max(over_full),
        "lora_over_frozen_wall": statistics.median(over_frozen),
        "ms_lora": 1e3 * statistics.median(times["lora"]),
        "ms_full": 1e3 * statistics.median(times["full"]),
        "ms_frozen": 1e3 * statistics.median(times["frozen"]),
        "wall_steps": len(over_full),
    }


def time_steps(
    workload: Workload, steps: Steps, lp: Any, compiled: dict[str, Any], rounds: int, warmup: int
) -> dict[str, float]:
    """Runs the compiled LoRA, full and frozen steps interleaved; see :func:`wall_summary`.

    Args:
        workload: The model.
        steps: Its step functions (for the optimizers' ``init``).
        lp: The concrete wrapped params (not modified: the donated halves are copies).
        compiled: Executables ``"lora"``, ``"full"`` and ``"frozen"`` (see :func:`base_costs`,
            :func:`rank_costs`).
        rounds: Timed rounds.
        warmup: Untimed rounds first.
    """
    batch = workload.batch
    trainable, frozen = lorax.split(lp)
    trainable = copy_tree(trainable)  # donated below
    full_params = copy_tree(workload.params)
    state = {
        "lora": (trainable, steps.tx_lora.init(trainable)),
        "full": (full_params, steps.tx_full.init(full_params)),
    }

    def run_lora() -> Any:
        t, o = state["lora"]
        t, o, loss = compiled["lora"](t, frozen, o, batch)
        state["lora"] = (t, o)
        return t, o, loss

    def run_full() -> Any:
        p, o, loss = compiled["full"](*state["full"], batch)
        state["full"] = (p, o)
        return p, o, loss

    def run_frozen() -> Any:
        return compiled["frozen"](workload.params, batch)

    runners = {"lora": run_lora, "full": run_full, "frozen": run_frozen}
    return wall_summary(interleaved_wall(runners, rounds, warmup))


# --------------------------------------------------------------------------------------------
# Memory: optimizer state, checkpoints, peak RSS


def optstate_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of ``tx.init(params)``, computed abstractly (nothing is allocated).

    Example:
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


# --------------------------------------------------------------------------------------------
# Scale planning on abstract Llama-2-shaped trees

LLAMA_SHAPES = {
    "llama2-7b": {"n_layers": 32, "d": 4096, "ffn": 11008, "kv": 4096, "vocab": 32000},
    "llama2-70b": {"n_layers": 80, "d": 8192, "ffn": 28672, "kv": 1024, "vocab": 32000},
}
"""Llama-2 shapes (``kv``: width of the k/v projections; 70B uses grouped-query attention)."""

TARGET_SETS = {
    "qkvo": r"/(q|k|v|o)_proj/kernel$",
    "all-linear": r"_proj/kernel$",
}
"""Scale-planning targets: attention only, and every linear layer but ``lm_head`` (PEFT's
``all-linear``)."""


def llama_shapes(
    n_layers: int, d: int, ffn: int, kv: int, vocab: int, dtype: Any = jnp.bfloat16
) -> dict[str, Any]:
    """An abstract Llama-shaped Linen parameter tree of ``jax.ShapeDtypeStruct`` leaves.

    Example:
        >>> tree = llama_shapes(n_layers=2, d=8, ffn=16, kv=4, vocab=10)
        >>> tree["layers_1"]["self_attn"]["k_proj"]["kernel"].shape
        (8, 4)
        >>> tree_bytes(tree) // 2  # bf16: 2 layers * 592 + embed 80 + lm_head 80 + norm 8
        1352
    """
    def leaf(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    def layer() -> dict[str, Any]:
        return {
            "input_layernorm": {"scale": leaf(d)},
            "self_attn": {
                "q_proj": {"kernel": leaf(d, d)},
                "k_proj": {"kernel": leaf(d, kv)},
                "v_proj": {"kernel": leaf(d, kv)},
                "o_proj": {"kernel": leaf(d, d)},
            },
            "post_attention_layernorm": {"scale": leaf(d)},
            "mlp": {
                "gate_proj": {"kernel": leaf(d, ffn)},
                "up_proj": {"kernel": leaf(d, ffn)},
                "down_proj": {"kernel": leaf(ffn, d)},
            },
        }

    tree: dict[str, Any] = {"embed_tokens": {"embedding": leaf(vocab, d)}}
    tree.update({f"layers_{i}": layer() for i in range(n_layers)})
    tree["norm"] = {"scale": leaf(d)}
    tree["lm_head"] = {"kernel": leaf(d, vocab)}
    return tree


def plan_scale(name: str, targets: str, rank: int = SCALE_RANK) -> dict[str, Any]:
    """Abstract wrap + Adam init of a Llama-shaped tree: sizes and the wall time of planning.

    Two ways, both timed: ``jax.eval_shape`` of ``lorax.wrap`` followed by
    ``lorax.optimizer(optax.adam).init`` (everything traced, factor initialisers included), and
    ``lorax.wrap`` applied to the ``jax.ShapeDtypeStruct`` tree directly (it returns abstract
    factors without tracing initialisers) followed by ``jax.eval_shape`` of ``init``. Neither
    may allocate device memory: the live-array count is recorded before and after.

    Args:
        name: A key of :data:`LLAMA_SHAPES`.
        targets: A key of :data:`TARGET_SETS`.
        rank: The LoRA rank.

    Returns:
        A JSON-ready dict of parameter counts, bytes and timings (``eval_shape_s``,
        ``direct_s``).
    """
    tree = llama_shapes(**LLAMA_SHAPES[name])
    tx = lorax.optimizer(optax.adam(LEARNING_RATE))

    def plan(params: Any) -> tuple[Any, Any]:
        lp = lorax.wrap(params, rank, targets=TARGET_SETS[targets])
        return lp, tx.init(lorax.split(lp)[0])

    live_before = len(jax.live_arrays())
    start = time.perf_counter()
    lp, opt_state = jax.eval_shape(plan, tree)
    eval_shape_s = time.perf_counter() - start
    start = time.perf_counter()
    direct = lorax.wrap(tree, rank, targets=TARGET_SETS[targets])
    direct_state = jax.eval_shape(tx.init, lorax.split(direct)[0])
    direct_s = time.perf_counter() - start
    live_after = len(jax.live_arrays())
    if jax.tree.structure((lp, opt_state)) != jax.tree.structure((direct, direct_state)):
        raise AssertionError("abstract wrap and eval_shape(wrap) disagree in structure")
    summary = lorax.summary(lp)
    return {
        "model": name,
        "targets": targets,
        "rank": rank,
        "dtype": "bfloat16",
        "total_params": summary.total,
        "trainable_params": summary.trainable,
        "trainable_fraction": summary.trainable / summary.total,
        "adapted_kernels": len(summary.adapted),
        "base_bytes": summary.frozen_bytes,
        "adapter_bytes": summary.trainable_bytes,
        "optstate_bytes_lora": tree_bytes(opt_state),
        "optstate_bytes_full": optstate_bytes(optax.adam(LEARNING_RATE), tree),
        "eval_shape_s": eval_shape_s,
        "direct_s": direct_s,
        "live_arrays_delta": live_after - live_before,
    }


# --------------------------------------------------------------------------------------------
# Rank scaling


def max_rank(params: Any, **wrap_kwargs: Any) -> int:
    """The largest rank every adapted kernel accepts: the least ``min(fan_in, fan_out)``.

    Args:
        params: A parameter tree (concrete or abstract).
        **wrap_kwargs: Keyword arguments of :func:`lorax.wrap` (``targets``, ``train``...).

    Example:
        >>> max_rank({"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((4, 32))}})
        4
    """
    lp = lorax.wrap(abstract(params), 1, **wrap_kwargs)
    kernels = [n for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    return min(min(math.prod(n.in_shape), math.prod(n.out_shape)) for n in kernels)


def rank_sweep(
    workload: Workload,
    ranks: Sequence[int],
    frozen_flops: float,
    full_flops: float,
    known: dict[int, float] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """LoRA-step FLOPs at each rank, against the frozen floor and the full step.

    Args:
        workload: The model.
        ranks: The ranks (each at most :func:`max_rank`).
        frozen_flops: FLOPs of the frozen forward + input-gradient step.
        full_flops: FLOPs of the full fine-tuning step.
        known: ``{rank: LoRA-step FLOPs}`` already measured (not compiled again).
        progress: Called with a label before each compile.

    Returns:
        One dict per rank: ``model``, ``rank``, ``trainable_params``, ``flops_lora``,
        ``lora_over_frozen_flops``, ``lora_over_full_flops``.
    """
    steps = make_steps(workload)
    known = dict(known or {})
    rows = []
    for rank in ranks:
        if rank not in known:
            progress(f"{workload.name} sweep r={rank}")
            known[rank] = lora_cost(workload, steps, rank, fast=True)[1].flops
        lp = lorax.wrap(abstract(workload.params), rank, **workload.wrap_kwargs)
        rows.append({
            "model": workload.name,
            "rank": rank,
            "trainable_params": lorax.summary(lp).trainable,
            "flops_lora": known[rank],
            "lora_over_frozen_flops": known[rank] / frozen_flops,
            "lora_over_full_flops": known[rank] / full_flops,
        })
    return rows


# --------------------------------------------------------------------------------------------
# The benchmark


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were measured: CPU, cores, versions, device, UTC date."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    device = jax.devices()[0]
    return {
        "processor": processor or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": _version("flax"),
        "optax": optax.__version__,
        "orbax_checkpoint": _version("orbax-checkpoint"),
        "lorax": lorax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def bench_model(
    workload: Workload,
    ranks: Sequence[int],
    steps: int,
    warmup: int,
    rss: bool,
    quick: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict[str, Any]], dict[str, Cost]]:
    """Every per-(model, rank) measurement of ``workload``.

    Returns:
        The result rows (one per rank, JSON-ready) and the rank-independent costs
        (``full``, ``frozen``, ``base_forward``) for the rank sweep.
    """
    fns = make_steps(workload)
    progress(f"{workload.name}: compile full/frozen/forward")
    base_compiled, base = base_costs(workload, fns, fast=quick)
    progress(f"{workload.name}: checkpoint full params")
    ckpt_full = checkpoint_bytes(workload.params)
    rss_common: dict[str, int | None] = {"peak_rss_init": None, "peak_rss_full": None}
    if rss:
        progress(f"{workload.name}: peak RSS (init)")
        rss_common["peak_rss_init"] = run_worker("init", workload.name, ranks[0], quick)
        progress(f"{workload.name}: peak RSS (full)")
        rss_common["peak_rss_full"] = run_worker("full", workload.name, ranks[0], quick)
    rows = []
    for rank in ranks:
        progress(f"{workload.name} r={rank}: compile lora/merged")
        compiled, more = rank_costs(workload, fns, rank, fast=quick)
        costs = {**base, **more}
        lp = workload.wrap(rank)
        trainable = lorax.split(lp)[0]
        summary = lorax.summary(lp)
        progress(f"{workload.name} r={rank}: checkpoint adapter")
        ckpt = checkpoint_bytes(trainable)
        progress(f"{workload.name} r={rank}: wall time ({steps} rounds)")
        wall = time_steps(workload, fns, lp, {**base_compiled, **compiled}, steps, warmup)
        row: dict[str, Any] = {
            "model": workload.name,
            "rank": rank,
            "quick": quick,
            "shapes": workload.shapes,
            "total_params": summary.total,
            "trainable_params": summary.trainable,
            "trainable_fraction": summary.trainable / summary.total,
            "params_bytes": tree_bytes(workload.params),
            "factor_bytes": factor_bytes(lp),
            "trainable_bytes": summary.trainable_bytes,
            **flop_ratios(costs),
            **wall,
            "optstate_bytes_lora": optstate_bytes(fns.tx_lora, trainable),
            "optstate_bytes_full": optstate_bytes(fns.tx_full, workload.params),
            "ckpt_bytes": ckpt,
            "ckpt_bytes_full": ckpt_full,
            "ckpt_bytes_lorax_save": lorax_save_bytes(lp),
        }
        for name, cost in costs.items():
            row[f"flops_{name}"] = cost.flops
            row[f"bytes_accessed_{name}"] = cost.bytes_accessed
        for name in ("lora", "full", "frozen"):
            row[f"temp_bytes_{name}"] = costs[name].temp_bytes
            row[f"argument_bytes_{name}"] = costs[name].argument_bytes
        row.update(rss_common)
        row["peak_rss_lora"] = None
        if rss:
            progress(f"{workload.name} r={rank}: peak RSS (lora)")
            row["peak_rss_lora"] = run_worker("lora", workload.name, rank, quick)
        rows.append(row)
    return rows, base


# --------------------------------------------------------------------------------------------
# Report


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


def fmt_count(n: float) -> str:
    """A parameter count with a unit suffix.

    Example:
        >>> fmt_count(8_388_608), fmt_count(6_738_415_616), fmt_count(999)
        ('8.39M', '6.74B', '999')
    """
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(
    results: Sequence[dict[str, Any]], scale: dict[str, Any], machine: dict[str, Any]
) -> str:
    """The markdown report: cost, memory, scale-planning and rank-scaling tables."""
    lines = [
        "# lorax benchmark: LoRA step vs full fine-tuning vs the frozen model",
        "",
        f"Machine: {machine['processor']} ({machine['cpus_usable']} usable of "
        f"{machine['cpu_count']} CPUs), {machine['backend']} / {machine['device_kind']}; "
        f"jax {machine['jax']}, flax {machine['flax']}, optax {machine['optax']}, "
        f"lorax {machine['lorax']}; {machine['date']}.",
        "",
        "FLOPs and bytes: XLA cost analysis of the compiled steps (deterministic). "
        "`frozen` = forward + gradient w.r.t. the embedded input only (the floor). "
        "Wall: median of per-round ratios (min-max), steps interleaved in one process.",
        "",
        "## Compute",
        "",
    ]
    lines += _table(
        ["model", "r", "trainable", "LoRA/full FLOPs", "LoRA/frozen FLOPs",
         "merged/base FLOPs", "LoRA fwd/base FLOPs", "LoRA/full wall (min-max)",
         "ms LoRA / full / frozen", "GFLOP LoRA / full / frozen"],
        [[r["model"], r["rank"],
          f"{fmt_count(r['trainable_params'])} ({100 * r['trainable_fraction']:.2f}%)",
          f"{r['lora_over_full_flops']:.3f}", f"{r['lora_over_frozen_flops']:.3f}",
          f"{r['merged_over_base_flops']:.3f}", f"{r['lora_forward_over_base_flops']:.3f}",
          f"{r['lora_over_full_wall']:.2f} ({r['lora_over_full_wall_min']:.2f}-"
          f"{r['lora_over_full_wall_max']:.2f})",
          f"{r['ms_lora']:.0f} / {r['ms_full']:.0f} / {r['ms_frozen']:.0f}",
          f"{r['flops_lora'] / 1e9:.1f} / {r['flops_full'] / 1e9:.1f} / "
          f"{r['flops_frozen'] / 1e9:.1f}"] for r in results],
    )
    lines += ["", "## Memory", ""]
    lines += _table(
        ["model", "r", "Adam state LoRA / full", "XLA temp LoRA / full / frozen",
         "peak RSS init / LoRA / full", "checkpoint LoRA / full (lorax.save)"],
        [[r["model"], r["rank"],
          f"{fmt_bytes(r['optstate_bytes_lora'])} / {fmt_bytes(r['optstate_bytes_full'])}",
          f"{fmt_bytes(r['temp_bytes_lora'])} / {fmt_bytes(r['temp_bytes_full'])} / "
          f"{fmt_bytes(r['temp_bytes_frozen'])}",
          f"{fmt_bytes(r['peak_rss_init'])} / {fmt_bytes(r['peak_rss_lora'])} / "
          f"{fmt_bytes(r['peak_rss_full'])}",
          f"{fmt_bytes(r['ckpt_bytes'])} / {fmt_bytes(r['ckpt_bytes_full'])} "
          f"({fmt_bytes(r['ckpt_bytes_lorax_save'])})"]
         for r in results],
    )
    lines += ["", f"## Scale planning (abstract, bf16, r = {SCALE_RANK})", ""]
    lines += _table(
        ["model", "targets", "trainable", "adapter", "Adam state LoRA / full",
         "eval_shape(wrap+init) s", "wrap(abstract)+init s", "live arrays +"],
        [[p["model"], p["targets"],
          f"{fmt_count(p['trainable_params'])} ({100 * p['trainable_fraction']:.3f}%)",
          fmt_bytes(p["adapter_bytes"]),
          f"{fmt_bytes(p['optstate_bytes_lora'])} / {fmt_bytes(p['optstate_bytes_full'])}",
          f"{p['eval_shape_s']:.3f}", f"{p['direct_s']:.3f}",
          p["live_arrays_delta"]] for p in scale["scale_planning"]],
    )
    for model in sorted({row["model"] for row in scale["rank_scaling"]}):
        rows = [row for row in scale["rank_scaling"] if row["model"] == model]
        lines += ["", f"## Rank scaling ({model}, LoRA-step FLOPs)", ""]
        lines += _table(
            ["r", "trainable", "GFLOP", "LoRA/frozen", "LoRA/full"],
            [[row["rank"], fmt_count(row["trainable_params"]), f"{row['flops_lora'] / 1e9:.2f}",
              f"{row['lora_over_frozen_flops']:.3f}", f"{row['lora_over_full_flops']:.3f}"]
             for row in rows],
        )
        costly = [row["rank"] for row in rows if row["lora_over_frozen_flops"] > 1.05]
        if costly:
            lines += ["", f"The low-rank term costs more than 5% over the frozen floor from "
                      f"r = {costly[0]}."]
    if scale.get("memory"):
        from experiments import memory

        lines += ["", "## Step memory by frozen base (XLA memory_analysis)", ""]
        lines += memory.render(scale["memory"])
    lines += [f"- {note}" for note in scale.get("notes", [])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def _rank(text: str) -> list[int]:
    return [_positive(part, "rank") for part in text.split(",")]


def _models(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(map(repr, unknown)) or repr(text)}; "
            f"expected a comma-separated subset of {', '.join(MODELS)}"
        )
    return names


def _positive(text: str, what: str = "int") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m experiments.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="What a LoRA step costs against full fine-tuning and the frozen model: "
        "FLOPs, memory, wall time.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, few steps, GPT only: a smoke run in seconds")
    parser.add_argument("--out", default="bench_out",
                        help="directory for bench.md, bench.json, bench_scale.json "
                        "(default: bench_out)")
    parser.add_argument("--json", action="store_true",
                        help='print {"results": <bench.json>, **<bench_scale.json>} instead of '
                        "the markdown table")
    parser.add_argument("--ranks", type=_rank, nargs="+", default=[[8]],
                        help="LoRA ranks, space- or comma-separated (default: 8)")
    parser.add_argument("--steps", type=_positive, default=None,
                        help="timed rounds per measurement (default: 10; 3 with --quick)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma-separated subset of gpt,minilm (default: both; gpt with "
                        "--quick)")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak RSS in subprocesses (default: on; off with --quick)")
    parser.add_argument("--_worker", choices=WORKER_KINDS, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ranks = sorted({r for group in args.ranks for r in group})
    quick = args.quick
    steps = args.steps or (3 if quick else 10)
    warmup = 1 if quick else 2
    models = args.models or (["gpt"] if quick else list(MODELS))
    rss = (not quick) if args.rss is None else args.rss

    if args._worker is not None:
        if len(models) != 1 or len(ranks) != 1:
            parser.error("--_worker takes exactly one model and one rank")
        print(json.dumps(worker_main(args._worker, models[0], ranks[0], steps, quick)))
        return 0

    start = time.perf_counter()
    workloads, notes = [], []
    for name in models:
        try:
            workload = make_workload(name, quick)
        except (ImportError, FileNotFoundError) as err:
            if args.models is not None:
                parser.error(f"model {name!r} is unavailable: {err}")
            notes.append(f"skipped {name}: {err}")
            print(f"bench: {notes[-1]}", file=sys.stderr)
            continue
        limit = max_rank(workload.params, **workload.wrap_kwargs)
        bad = [r for r in ranks if r > limit]
        if bad:
            parser.error(f"rank {bad[0]} is too large for {name!r}: every adapted kernel needs "
                         f"rank <= min(fan_in, fan_out) = {limit}")
        workloads.append(workload)

    machine = machine_info()
    sweeps = {
        w.name: [r for r in (QUICK_SWEEP if quick else RANK_SWEEP)
                 if r <= max_rank(w.params, **w.wrap_kwargs)]
        for w in workloads if w.name == "gpt"
    }
    stages = (len(workloads) * (2 + 2 * rss + len(ranks) * (3 + rss))
              + sum(len(set(rs) - set(ranks)) for rs in sweeps.values())
              + len(LLAMA_SHAPES) * len(TARGET_SETS) + 1)
    results, sweep, planning = [], [], []
    with tqdm(total=stages, file=sys.stderr, desc="bench", disable=None, leave=False) as bar:
        def progress(label: str) -> None:
            bar.set_description(label)
            bar.update(1)

        for workload in workloads:
            rows, base = bench_model(workload, ranks, steps, warmup, rss, quick, progress)
            results += rows
            if workload.name in sweeps:
                known = {row["rank"]: row["flops_lora"] for row in rows}
                sweep += rank_sweep(workload, sweeps[workload.name], base["frozen"].flops,
                                    base["full"].flops, known, progress)
        for name in LLAMA_SHAPES:
            for targets in TARGET_SETS:
                progress(f"scale {name} {targets}")
                planning.append(plan_scale(name, targets))
        progress("step memory by base")
        from experiments import memory

        memory_rows = memory.memory_rows(QUICK_GPT, (1, QUICK_BATCH)) if quick else \
            memory.memory_rows()

    for row in results:
        row["machine"] = machine
    scale = {"machine": machine, "scale_planning": planning, "rank_scaling": sweep,
             "memory": memory_rows, "notes": notes, "elapsed_s": time.perf_counter() - start}
    report = render_markdown(results, scale, machine)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, allow_nan=False)
    with open(os.path.join(args.out, "bench_scale.json"), "w", encoding="utf-8") as handle:
        json.dump(scale, handle, indent=1, allow_nan=False)
    with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    if args.json:
        print(json.dumps({"results": results, **scale}, indent=1, allow_nan=False))
    else:
        print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

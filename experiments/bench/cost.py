"""XLA's cost and memory analysis of the benchmark's compiled programs.

Every program is compiled on abstract (``jax.ShapeDtypeStruct``) arguments, so FLOPs and bytes
depend on shapes only and are deterministic: :func:`compile_step` returns an executable and its
:class:`Cost`; :func:`base_costs` and :func:`rank_costs` compile a workload's rank-independent and
rank-dependent programs, and :func:`flop_ratios` turns their costs into the benchmark's ratios.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

import lorax
from experiments.bench.handwritten import init_factors
from experiments.bench.steps import Steps, make_steps
from experiments.bench.workloads import Workload


@dataclasses.dataclass(frozen=True)
class Cost:
    """XLA's cost and memory analysis of one compiled program (:attr:`peak_bytes` derived).

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

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, less the donated (aliased) outputs."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


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
        >>> import jax.numpy as jnp
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


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lora_cost(workload: Workload, steps: Steps, rank: int, fast: bool = False):
    """Compiles the LoRA step at ``rank`` on abstract arguments (trainable half and optimizer
    state donated); returns ``(executable, Cost)``."""
    trainable, frozen = lorax.split(lorax.wrap(abstract(workload.params), rank,
                                               **workload.wrap_kwargs))
    opt_state = jax.eval_shape(steps.tx_lora.init, trainable)
    return compile_step(steps.lora, trainable, frozen, opt_state, workload.batch,
                        donate_argnums=(0, 2), fast=fast)


def handwritten_cost(workload: Workload, steps: Steps, rank: int, fast: bool = False):
    """Compiles the hand-written LoRA step (:mod:`experiments.bench.handwritten`) at ``rank``
    on abstract arguments (factors and optimizer state donated); returns ``(executable,
    Cost)``."""
    factors = abstract(init_factors(abstract(workload.params), rank))
    return compile_step(steps.handwritten, factors, abstract(workload.params),
                        jax.eval_shape(steps.tx_full.init, factors), workload.batch,
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
    if steps.handwritten is not None:
        compiled["handwritten"], costs["handwritten"] = handwritten_cost(workload, steps, rank,
                                                                         fast=fast)
    return compiled, costs


def flop_ratios(costs: dict[str, Cost]) -> dict[str, float]:
    """The benchmark's FLOP (and bytes-accessed) ratios from the programs' :class:`Cost`.

    Args:
        costs: ``{"lora", "full", "frozen", "base_forward", "merged_forward",
            "lora_forward"}`` costs.

    Returns:
        ``lora_over_full_flops``, ``lora_over_frozen_flops``, ``merged_over_base_flops``,
        ``lora_forward_over_base_flops``, ``full_over_frozen_flops``,
        ``lora_over_full_bytes_accessed`` and ``lora_over_frozen_bytes_accessed``; with a
        ``handwritten`` cost also ``lora_over_handwritten_flops`` and
        ``lora_over_handwritten_bytes_accessed``.
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
        "lora_over_frozen_bytes_accessed": ratio("lora", "frozen", "bytes_accessed"),
        **({"lora_over_handwritten_flops": ratio("lora", "handwritten"),
            "lora_over_handwritten_bytes_accessed": ratio("lora", "handwritten", "bytes_accessed")}
           if "handwritten" in costs else {}),
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

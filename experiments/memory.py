"""The benchmark's memory table: what a train step holds, from XLA's ``memory_analysis()``.

For one GPT shape and batch size it compiles (never runs) the gradient programs

* ``full``: ``value_and_grad`` of the loss with respect to every parameter;
* ``frozen``: the floor, the gradient with respect to the embedded input only;
* ``lora_<base>``: ``value_and_grad`` of the :func:`lorax.lora` loss with respect to the
  trainable half of :func:`lorax.split`, every kernel adapted at rank 8, with the frozen
  kernels stored as float32 (``f32``), bfloat16 (``bf16``) or quantized by
  :func:`lorax.quantize` (``nf4``, ``int8``; block size 64);

and reports XLA's argument, temp and output bytes of each, and ``peak = argument + output +
temp - alias`` (what the executable holds at once; ``alias`` is 0: nothing is donated). All
numbers are deterministic (shapes only). ``python -m experiments.memory`` prints the table for
:data:`MEMORY_GPT` at :data:`MEMORY_BATCHES`; :mod:`experiments.bench` includes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lorax
from experiments import gpt
from experiments.bench.cost import Cost, compile_step
from experiments.bench.footprint import fmt_bytes
from experiments.bench.steps import make_steps
from experiments.bench.workloads import QUICK_GPT, gpt_workload

MEMORY_GPT = gpt.GPTConfig(vocab_size=8192, d_model=1024, n_layers=8, n_heads=16, d_ff=4096,
                           max_len=128)
"""A weight-dominated shape: 416 MiB of float32 kernels, 128 tokens a sequence."""

MEMORY_BATCHES = (1, 16)
"""Batch sizes of the table: weights dominate at 1, activations grow with the batch."""

BASES = ("f32", "bf16", "nf4", "int8")
"""How the frozen kernels are stored in the ``lora_<base>`` programs."""

PROGRAMS = ("full", "frozen", *(f"lora_{base}" for base in BASES))


def with_base(lp: Any, base: str) -> Any:
    """The wrapped tree ``lp`` with its frozen kernels stored as ``base`` (one of :data:`BASES`).

    Example:
        >>> lp = lorax.wrap({"kernel": jax.ShapeDtypeStruct((128, 64), jnp.float32)}, rank=2)
        >>> with_base(lp, "bf16")["kernel"].w.dtype, with_base(lp, "nf4")["kernel"].w.nbytes
        (dtype(bfloat16), 4608)
    """
    if base == "f32":
        return lp
    if base == "bf16":
        def cast(node: Any) -> Any:
            if not lorax.is_lora(node):
                return node
            return dataclasses.replace(node, w=jax.ShapeDtypeStruct(node.w.shape, jnp.bfloat16))

        return jax.tree.map(cast, lp, is_leaf=lorax.is_lora)
    if base in ("nf4", "int8"):
        return lorax.quantize(lp, base)
    raise ValueError(f"expected `base` to be one of {BASES}, got {base!r}")


def kernel_bytes(lp: Any) -> int:
    """Bytes of the frozen kernels of ``lp`` as float32 (the unit of the temp goals)."""
    nodes = [n for n in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(n)]
    return sum(4 * n.w.size for n in nodes)


def memory_costs(config: gpt.GPTConfig = MEMORY_GPT, batch_size: int = 1, rank: int = 8,
                 bases: Sequence[str] = BASES, fast: bool = True) -> dict[str, Cost]:
    """Compiles the table's programs (on abstract params) and returns their costs.

    Args:
        config: The GPT's shapes.
        batch_size: Sequences per batch.
        rank: LoRA rank of every kernel.
        bases: Which ``lora_<base>`` programs to compile.
        fast: Compile with :data:`experiments.bench.cost.FAST_COMPILE` (the HLO passes, hence the
            memory analysis, are unchanged).

    Returns:
        ``{program: Cost}`` for ``full``, ``frozen`` and ``lora_<base>`` for each base.
    """
    workload = gpt_workload(config, batch_size=batch_size, abstract_params=True)
    params, batch = workload.params, workload.batch
    steps = make_steps(workload)
    lora_loss = lorax.lora(workload.loss)

    def full(params: Any, batch: tuple[Any, ...]) -> Any:
        return jax.value_and_grad(workload.loss)(params, batch)

    def lora(trainable: Any, frozen: Any, batch: tuple[Any, ...]) -> Any:
        return lorax.value_and_grad(lora_loss)(lorax.combine(trainable, frozen), batch)

    costs = {"full": compile_step(full, params, batch, fast=fast)[1],
             "frozen": compile_step(steps.frozen, params, batch, fast=fast)[1]}
    lp = lorax.wrap(params, rank)
    for base in bases:
        trainable, frozen = lorax.split(with_base(lp, base))
        costs[f"lora_{base}"] = compile_step(lora, trainable, frozen, batch, fast=fast)[1]
    return costs


def peak_bytes(cost: Cost) -> int:
    """``argument + output + temp - alias`` bytes of a compiled program."""
    return cost.argument_bytes + cost.output_bytes + cost.temp_bytes - cost.alias_bytes


def goal_ratios(costs: dict[str, Cost], f32_kernel_bytes: int) -> dict[str, float]:
    """The issue's goals: each quantized step against the f32-base LoRA step.

    Returns:
        For ``q`` in nf4, int8 (when compiled): ``peak_<q>_over_f32`` (peak ratio),
        ``extra_temp_<q>_over_kernels`` (``(temp_q - temp_f32) / f32 kernel bytes``) and
        ``flops_<q>_over_f32``.
    """
    ref = costs["lora_f32"]
    out = {}
    for q in ("nf4", "int8"):
        cost = costs.get(f"lora_{q}")
        if cost is None:
            continue
        out[f"peak_{q}_over_f32"] = peak_bytes(cost) / peak_bytes(ref)
        out[f"extra_temp_{q}_over_kernels"] = (cost.temp_bytes - ref.temp_bytes) / f32_kernel_bytes
        out[f"flops_{q}_over_f32"] = cost.flops / ref.flops
    return out


def memory_rows(config: gpt.GPTConfig = MEMORY_GPT,
                batches: Sequence[int] = MEMORY_BATCHES, rank: int = 8,
                fast: bool = True) -> list[dict[str, Any]]:
    """One JSON-ready row per (batch size, program): bytes, peak, and peak / ``lora_f32``."""
    kernels = kernel_bytes(lorax.wrap(gpt.init(config, jax.random.key(0), abstract=True)[1], 1))
    rows = []
    for batch in batches:
        costs = memory_costs(config, batch, rank, fast=fast)
        goals = goal_ratios(costs, kernels)
        ref = peak_bytes(costs["lora_f32"])
        for name, cost in costs.items():
            rows.append({"batch": batch, "program": name, "rank": rank,
                         "shapes": dataclasses.asdict(config), "f32_kernel_bytes": kernels,
                         "argument_bytes": cost.argument_bytes, "temp_bytes": cost.temp_bytes,
                         "output_bytes": cost.output_bytes, "alias_bytes": cost.alias_bytes,
                         "peak_bytes": peak_bytes(cost),
                         "peak_over_lora_f32": peak_bytes(cost) / ref, "flops": cost.flops,
                         **({"goals": goals} if name == "lora_f32" else {})})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else fmt_bytes(n)


def render(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The memory table (markdown lines) and the goal ratios of each batch size.

    Example:
        >>> row = {"batch": 1, "program": "lora_f32", "argument_bytes": 2**24, "temp_bytes": 0,
        ...        "output_bytes": 1536, "peak_bytes": 2**24 + 1536, "peak_over_lora_f32": 1.0}
        >>> render([row])[2]
        '| 1 | lora_f32 | 16 MiB | 0 B | 1.5 KiB | 16 MiB | 1.000 |'
    """
    lines = ["| batch | program | argument | temp | output | peak | peak / lora_f32 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['program']} | {_mib(r['argument_bytes'])} | "
              f"{_mib(r['temp_bytes'])} | {_mib(r['output_bytes'])} | {_mib(r['peak_bytes'])} | "
              f"{r['peak_over_lora_f32']:.3f} |" for r in rows]
    for r in rows:
        if "goals" in r:
            goals = ", ".join(f"{k} {v:.3f}" for k, v in r["goals"].items())
            lines += ["", f"Batch {r['batch']}: {goals}."]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the memory table for :data:`MEMORY_GPT` (``--quick``: the tiny GPT)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.memory", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny GPT instead of MEMORY_GPT (a smoke run)")
    args = parser.parse_args(argv)
    config = QUICK_GPT if args.quick else MEMORY_GPT
    print("\n".join(render(memory_rows(config))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

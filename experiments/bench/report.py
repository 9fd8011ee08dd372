"""The benchmark's markdown report, and the machine the numbers were measured on."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from typing import Any

import jax
import optax

import lorax
from experiments import memory
from experiments.bench.footprint import fmt_bytes
from experiments.bench.scale import SCALE_RANK


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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else fmt_count(value)


def _spread(row: dict[str, Any], other: str) -> str:
    """``median (min-max)`` of the per-round LoRA/``other`` wall ratios, ``-`` if not timed."""
    key = f"lora_over_{other}_wall"
    if key not in row:
        return "-"
    return f"{row[key]:.2f} ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"


def _wall(row: dict[str, Any], key: str) -> str:
    """``median (min-max)`` of the per-round wall ratios ``row[key + "_wall"]``."""
    key += "_wall"
    return f"{row[key]:.2f} ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(
    results: Sequence[dict[str, Any]], scale: dict[str, Any], machine: dict[str, Any]
) -> str:
    """The markdown report: cost, memory, scale-planning, rank-scaling and decode tables."""
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
    lines += ["", "## Against the floor", "",
              "Bytes and FLOPs: XLA cost analysis; wall: median of per-round ratios (min-max). "
              "`hand` = the same LoRA step hand-written in plain JAX "
              "(`x·stop_gradient(W) + s·(x·A)·B`, `experiments/bench/handwritten.py`).", ""]
    lines += _table(
        ["model", "r", "dtype", "LoRA/frozen bytes", "LoRA/hand bytes", "LoRA/full bytes",
         "LoRA/frozen FLOPs", "LoRA/frozen wall", "LoRA/full wall", "LoRA/hand wall",
         "tokens/s LoRA / frozen / full / hand", "peak LoRA / frozen / full / hand"],
        [[r["model"], r["rank"], r.get("dtype", "float32"),
          f"{r['lora_over_frozen_bytes_accessed']:.3f}",
          _ratio(r.get("lora_over_handwritten_bytes_accessed")),
          f"{r['lora_over_full_bytes_accessed']:.3f}", f"{r['lora_over_frozen_flops']:.3f}",
          _spread(r, "frozen"), _spread(r, "full"), _spread(r, "handwritten"),
          " / ".join(_rate(r.get(f"tokens_per_s_{k}"))
                     for k in ("lora", "frozen", "full", "handwritten")),
          " / ".join(fmt_bytes(r[f"peak_bytes_{k}"]) if f"peak_bytes_{k}" in r else "-"
                     for k in ("lora", "frozen", "full", "handwritten"))]
         for r in results],
    )
    lines += ["", "## Compile time (trace + lower + compile of the step, wall s, caches "
              "cleared, LoRA and full interleaved; median of the per-repetition ratios)", ""]
    lines += _table(
        ["model", "r", "LoRA/full compile (min-max)", "s LoRA / full"],
        [[r["model"], r["rank"], f"{r['lora_over_full_compile']:.2f} "
          f"({r['lora_over_full_compile_min']:.2f}-{r['lora_over_full_compile_max']:.2f})",
          f"{r['compile_s_lora']:.1f} / {r['compile_s_full']:.1f}"]
         for r in results if "lora_over_full_compile" in r],
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
    if scale.get("trace"):
        trace = scale["trace"]
        traced = [(trace, " (bench GPT)"), *((row, " (narrow)") for row in trace["sweep"])]
        lines += ["", "## Trace time (CPU s of `jax.jit(step).trace`, median of interleaved "
                  f"repetitions, {trace['reps']} each)", ""]
        lines += _table(
            ["layers", "LoRA/full (min-max)", "s LoRA / full"],
            [[f"{row['n_layers']}{label}", f"{row['lora_over_full_trace']:.2f} "
              f"({row['lora_over_full_trace_min']:.2f}-{row['lora_over_full_trace_max']:.2f})",
              f"{row['trace_s_lora']:.2f} / {row['trace_s_full']:.2f}"]
             for row, label in traced],
        )
    if scale.get("decode"):
        lines += ["", "## Decode (greedy, KV cache: base vs merged vs unmerged adapter)", "",
                  "Tokens/s: generated tokens over the whole call (prefill included), median of "
                  "interleaved rounds; ratios: median of per-round wall ratios (min-max). Step "
                  "bytes/FLOPs: XLA cost analysis of one single-token decode step.", ""]
        lines += _table(
            ["model", "dtype", "rows", "prompt + new", "r", "tokens/s base / merged / unmerged",
             "unmerged/merged wall", "merged/base wall", "step bytes base / merged / unmerged",
             "unmerged/merged step bytes / FLOPs", "same tokens"],
            [[d["model"], d.get("dtype", "float32"), d["rows"],
              f"{d['prompt']} + {d['new_tokens']}", d["rank"],
              " / ".join(_rate(d[f"tokens_per_s_{k}"]) for k in ("base", "merged", "unmerged")),
              _wall(d, "unmerged_over_merged"), _wall(d, "merged_over_base"),
              " / ".join(fmt_bytes(d[f"step_bytes_{k}"]) for k in ("base", "merged", "unmerged")),
              f"{d['unmerged_over_merged_step_bytes']:.3f} / "
              f"{d['unmerged_over_merged_step_flops']:.3f}",
              f"{100 * d['tokens_match']:.1f}%"] for d in scale["decode"]],
        )
    if scale.get("memory"):
        lines += ["", "## Step memory by frozen base (XLA memory_analysis)", ""]
        lines += memory.render(scale["memory"])
    if scale.get("nnx_lora"):
        from experiments.bench.nnx_lora import render

        lines += ["", *render(scale["nnx_lora"])]
    lines += [f"- {note}" for note in scale.get("notes", [])]
    return "\n".join(lines) + "\n"

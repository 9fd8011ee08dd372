"""LoRA training steps across devices and processes, checked against one device.

* Parallelism modes on 8 forced CPU devices: ``jit`` over a data-parallel Mesh, FSDP, Megatron
  tensor parallelism, ``jax.pmap`` with ``lax.pmean`` of the factor gradients, and
  ``jax.shard_map``. Each runs three SGD steps of :mod:`experiments.train_distributed`'s model
  and must match the single-device step (losses and updated factors to float32 rounding) with W
  untouched; the compiled HLO of the LoRA step may add no collective the frozen-base step lacks
  except small factor-sized ones.
* A real multi-process run: two ``jax.distributed`` processes (gloo CPU collectives, 2 devices
  each, one global Mesh of 4) train, checkpoint, lose a process, restart, restore and finish with
  the factors of a single-process run.

``XLA_FLAGS`` must be set before jax is imported, and the rest of the suite runs on one device,
so the mode checks run this file as a script in a subprocess (``python tests/test_distributed.py
REPORT.json``) that writes a JSON report the tests below read.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, cpu_devices_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax
from experiments import gpt
from experiments import train_distributed as td
from lorax import compat

ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8
STEPS = 3
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# The jit-over-Mesh modes: mesh axis sizes over the 8 devices.
MESHES = {"dp": {"data": 8}, "fsdp": {"data": 2, "fsdp": 4}, "tp": {"data": 2, "model": 4}}
MODES = (*MESHES, "pmap", "shard_map", "shard_map_pcast")
# shard_map's default check_vma=True inserts `pvary` on the replicated W, which lorax.lora
# cannot factorize yet (materializes W + s*A@B with a LoRAFallbackWarning): a lorax bug.
# ----------------------------------------------------------------------------- HLO collectives


_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _instructions(hlo: str):
    """``(name, result shape text, opcode, operand names)`` for each HLO instruction line."""
    for line in hlo.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        rest = line[m.end():]
        end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        args = rest[op.end() - 1 : _balanced(rest, op.end() - 1)]
        yield m["name"], shape, op[1], _OPERAND.findall(args)


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(shape)]


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """Every collective of a compiled HLO module as ``(op, [(dtype, dims), ...])``.

    The listed arrays are the full-size side of the op: the gathered result of an all-gather,
    the unscattered operands of a reduce-scatter, the result otherwise (a tuple all-reduce made
    by XLA's combiner lists each of its arrays). Async pairs count once, at their ``-done``.

    Example:
        >>> hlo = "%y = f32[8,2]{1,0} add(%a, %b)\\n%x = f32[8,2]{1,0} all-reduce(%y), to_apply=%s"
        >>> collectives(hlo)
        [('all-reduce', [('f32', (8, 2))])]
    """
    shapes, found = {}, []
    for name, shape, op, operands in _instructions(hlo):
        shapes[name] = shape
        kind = op.removesuffix("-done")
        if kind not in COLLECTIVES or op.endswith("-start"):
            continue
        if kind == "reduce-scatter":
            found.append((kind, [a for o in operands for a in _arrays(shapes.get(o, ""))]))
        else:
            found.append((kind, _arrays(shape)))
    return found


def collective_summary(hlo: str) -> dict[str, Any]:
    """Per-op instruction counts and element totals of :func:`collectives`."""
    ops = collectives(hlo)
    elements: Counter[str] = Counter()
    for op, arrays in ops:
        elements[op] += sum(math.prod(dims) for _, dims in arrays)
    return {
        "count": dict(Counter(op for op, _ in ops)),
        "elements": dict(elements),
        "arrays": Counter((op, dt, dims) for op, arrays in ops for dt, dims in arrays),
    }


# ----------------------------------------------------------------------------- the mode worker


def _config() -> td.Config:
    return td.Config(layers=2, optimizer="sgd", lr=0.5, steps=STEPS)


def _frozen_step(model: gpt.GPT, axis_name: str | None = None):
    """The frozen-base step: same model and loss, differentiated w.r.t. the input activations
    only (a backward pass through every frozen W, no parameter gradients)."""

    def step(params, tokens):
        h = model.apply({"params": params}, tokens, method="embed")

        def loss_of(h):
            logits = model.apply({"params": params}, h, method="decode")
            return gpt.next_token_loss(logits[:, :-1], tokens[:, 1:])

        loss, dh = jax.value_and_grad(loss_of)(h)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        return loss, dh

    return step


def _vma_step(model: gpt.GPT, tx, pcast_frozen: bool):
    """A shard_map step in the check_vma style: the loss is pmean-ed inside the differentiated
    function, so the factor gradients come out reduced (no explicit gradient pmean)."""

    @lorax.lora
    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return gpt.next_token_loss(logits[:, :-1], tokens[:, 1:])

    def step(train, frozen, opt_state, tokens):
        if pcast_frozen:  # the workaround: make W device-varying so no `pvary` is inserted on it
            frozen = jax.tree.map(lambda x: lorax.compat.pvary(x, "data"), frozen)

        def loss_of(lp):
            return jax.lax.pmean(loss_fn(lp, tokens), "data")

        loss, grads = lorax.value_and_grad(loss_of)(lorax.combine(train, frozen))
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    return step


def _max_diff(x: Any, y: Any) -> float:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(
        np.asarray(a, np.float64) - np.asarray(b, np.float64)))), x, y)
    return max(jax.tree.leaves(diffs))


def _outcome(check: Any, *args: Any, **kwargs: Any) -> str:
    """``"ok"``, or the message of the AssertionError ``check(*args, **kwargs)`` raised (the
    report is JSON, so the child process records the outcome of each comparison)."""
    try:
        check(*args, **kwargs)
    except AssertionError as e:
        return str(e)
    return "ok"


def _hlo_report(lora_hlo: str, frozen_hlo: str, lp: Any, config: td.Config) -> dict[str, Any]:
    """Collectives of the LoRA and frozen steps; ``lp`` is the mode's wrapped tree."""
    lora_c, frozen_c = collective_summary(lora_hlo), collective_summary(frozen_hlo)
    extra = lora_c["arrays"] - frozen_c["arrays"]
    nodes = [x for x in jax.tree.leaves(lp, is_leaf=lorax.is_lora) if lorax.is_lora(x)]
    # LoRA's own traffic is (i) factor gradients, each at most the largest factor, and (ii)
    # rank-r activations x·a (or their cotangents) reduced over a split input axis, at most
    # global tokens x rank. `bound` is the larger; any collective LoRA adds must fit in it.
    # It is asserted below the smallest per-device shard of any adapted W, so a collective on
    # W (or on a W shard, or on a W-sized gradient) can never pass as "small".
    bound = max(max(math.prod(n.a.shape) for n in nodes), max(math.prod(n.b.shape) for n in nodes),
                config.batch_size * config.seq_len * config.rank)
    smallest_w_shard = min(math.prod(n.w.sharding.shard_shape(n.w.shape)) for n in nodes)
    return {
        "lora": {"count": lora_c["count"], "elements": lora_c["elements"]},
        "frozen": {"count": frozen_c["count"], "elements": frozen_c["elements"]},
        "extra": [[op, dt, list(dims), n] for (op, dt, dims), n in sorted(extra.items())],
        "bound": bound,
        "smallest_w_shard": smallest_w_shard,
    }


def _modes_worker(report_path: str) -> None:
    """Runs every mode on 8 CPU devices and writes the JSON report (subprocess entry point)."""
    jax.config.update("jax_numpy_rank_promotion", "raise")
    warnings.simplefilter("error")  # a LoRAFallbackWarning (W materialized) fails the mode
    assert jax.device_count() == N_DEVICES, jax.devices()
    config = _config()
    model = gpt.GPT(config.model_config())
    tokens0 = jnp.zeros((config.batch_size, config.seq_len), jnp.int32)
    params = model.init(jax.random.key(config.seed), tokens0)["params"]
    params = jax.tree.map(np.asarray, params)  # host copies: every mode places its own
    wrap_kw = dict(rank=config.rank, targets=list(td.TARGETS), alpha=config.alpha,
                   key=jax.random.key(config.seed + 1))
    batches = [td.batch_rows(config, s, range(config.batch_size)) for s in range(STEPS)]
    tx = td.make_optimizer(config)

    # The single-device reference.
    lp_ref = lorax.wrap(jax.device_put(params, jax.devices()[0]), **wrap_kw)
    train, frozen = lorax.split(lp_ref)
    opt_state = tx.init(train)
    ref_step = jax.jit(td.make_train_step(model, tx))
    ref_losses = []
    for tokens in batches:
        train, opt_state, loss = ref_step(train, frozen, opt_state, tokens)
        ref_losses.append(float(loss))
    ref_train = train
    ref_frozen_loss = float(jax.jit(_frozen_step(model))(params, batches[0])[0])
    report: dict[str, Any] = {"ref_losses": ref_losses, "modes": {}}

    def finish(name, losses, train, frozen, lora_hlo, frozen_hlo, frozen_loss, **more):
        report["modes"][name] = {
            # Reductions split across devices round differently: float32 eps-relative.
            "losses": _outcome(assert_close, losses, ref_losses, dtype=np.float32),
            "factors": _outcome(assert_close, train, ref_train),
            "factor_change": _max_diff(train, lorax.split(lp_ref)[0]),
            "frozen_loss": _outcome(assert_close, frozen_loss, ref_frozen_loss,
                                    dtype=np.float32),
            "w_untouched": _outcome(chex.assert_trees_all_equal, lorax.unwrap(frozen), params),
            "hlo": _hlo_report(lora_hlo, frozen_hlo, lorax.combine(train, frozen), config),
            **more,
        }

    def run_steps(step, train, frozen, opt_state, batch_sh):
        # Compile once; the executable both runs the steps and shows its collectives.
        step = step.lower(train, frozen, opt_state, batches[0]).compile()
        losses = []
        for tokens in batches:
            train, opt_state, loss = step(train, frozen, opt_state,
                                          jax.device_put(tokens, batch_sh))
            losses.append(float(loss))
        return step, train, losses

    def jit_mode(name):
        mesh = td.make_mesh(MESHES[name])
        specs = td.param_specs(params, mesh)
        base_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        lp = lorax.wrap(jax.device_put(params, base_sh), **wrap_kw)
        wanted = lorax.shardings(lp, specs, mesh)
        placed = jax.tree.map(lambda x, s: x.sharding == s, lp, wanted)
        train_sh, frozen_sh = lorax.split(wanted)
        train, frozen = lorax.split(lp)
        opt_sh = td.state_shardings(jax.eval_shape(tx.init, train), train_sh,
                                    NamedSharding(mesh, P()))
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(train)
        batch_sh = NamedSharding(mesh, td.batch_spec(mesh))
        step = jax.jit(td.make_train_step(model, tx),
                       in_shardings=(train_sh, frozen_sh, opt_sh, batch_sh),
                       out_shardings=(train_sh, opt_sh, NamedSharding(mesh, P())))
        step, train, losses = run_steps(step, train, frozen, opt_state, batch_sh)
        act_sh = NamedSharding(mesh, P(*td.batch_spec(mesh), None))
        frozen_fn = jax.jit(_frozen_step(model), in_shardings=(base_sh, batch_sh),
                            out_shardings=(NamedSharding(mesh, P()), act_sh))
        base = jax.device_put(params, base_sh)
        frozen_fn = frozen_fn.lower(base, batches[0]).compile()
        frozen_loss = float(frozen_fn(base, jax.device_put(batches[0], batch_sh))[0])
        lora_hlo, frozen_hlo = step.as_text(), frozen_fn.as_text()
        out_placed = jax.tree.map(lambda x, s: x.sharding == s, train, train_sh)
        finish(name, losses, train, frozen, lora_hlo, frozen_hlo, frozen_loss,
               factors_placed=all(jax.tree.leaves(placed)) and all(jax.tree.leaves(out_placed)),
               specs={n.path: [str(n.w), str(n.a), str(n.b)] for n in jax.tree.leaves(
                   lorax.partition_specs(lp, specs), is_leaf=lorax.is_lora)
                   if lorax.is_lora(n)})

    def pmap_mode(name):
        lp = lorax.wrap(jax.device_put(params, jax.devices()[0]), **wrap_kw)
        train, frozen = lorax.split(lp)
        opt_state = tx.init(train)
        pstep = jax.pmap(td.make_train_step(model, tx, axis_name="batch"), axis_name="batch",
                         in_axes=(None, None, None, 0))

        def per_device(tokens):
            return tokens.reshape(N_DEVICES, -1, *tokens.shape[1:])

        step = pstep.lower(train, frozen, opt_state, per_device(batches[0])).compile()
        losses, replicas_equal = [], True
        for tokens in batches:
            # The pmap call replicates the unmapped inputs (a compiled pmap has no
            # input_shardings on jax 0.7.1).
            stacked, opt_state, loss = pstep(train, frozen, opt_state, per_device(tokens))
            replicas_equal &= all(bool(np.all(np.asarray(x) == np.asarray(x)[:1]))
                                  for x in jax.tree.leaves((stacked, loss)))
            # Every replica holds the same update; continue from replica 0 (unmapped inputs).
            train = jax.tree.map(lambda x: x[0], stacked)
            opt_state = jax.tree.map(lambda x: x[0], opt_state)
            losses.append(float(loss[0]))
        pfrozen = jax.pmap(_frozen_step(model, "batch"), axis_name="batch", in_axes=(None, 0))
        frozen_fn = pfrozen.lower(params, per_device(batches[0])).compile()
        frozen_loss = float(pfrozen(params, per_device(batches[0]))[0][0])
        lora_hlo, frozen_hlo = step.as_text(), frozen_fn.as_text()
        finish(name, losses, train, frozen, lora_hlo, frozen_hlo, frozen_loss,
               replicas_equal=replicas_equal)

    def shard_map_mode(name):
        mesh = td.make_mesh({"data": N_DEVICES})
        lp = lorax.wrap(jax.device_put(params, NamedSharding(mesh, P())), **wrap_kw)
        train, frozen = lorax.split(lp)
        opt_state = tx.init(train)
        rep, rows = P(), P("data")
        if name == "shard_map":  # the pmap-style step: explicit pmean of loss and gradients
            body = td.make_train_step(model, tx, axis_name="data")
            kw = {"check_vma": False}
        else:  # check_vma=True (the default)
            body = _vma_step(model, tx, pcast_frozen=name == "shard_map_pcast")
            kw = {}
        step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, rep, rows),
                                     out_specs=(rep, rep, rep), **kw))
        batch_sh = NamedSharding(mesh, rows)
        step, train, losses = run_steps(step, train, frozen, opt_state, batch_sh)
        frozen_fn = jax.jit(jax.shard_map(_frozen_step(model, "data"), mesh=mesh,
                                          in_specs=(rep, rows), out_specs=(rep, rows)))
        base = jax.device_put(params, NamedSharding(mesh, P()))
        frozen_fn = frozen_fn.lower(base, batches[0]).compile()
        frozen_loss = float(frozen_fn(base, jax.device_put(batches[0], batch_sh))[0])
        lora_hlo, frozen_hlo = step.as_text(), frozen_fn.as_text()
        finish(name, losses, train, frozen, lora_hlo, frozen_hlo, frozen_loss)

    runners = {**{name: jit_mode for name in MESHES}, "pmap": pmap_mode,
               "shard_map": shard_map_mode, "shard_map_pcast": shard_map_mode,
               "shard_map_vma": shard_map_mode}
    for name, run in runners.items():
        start = time.perf_counter()
        try:
            run(name)
        except Exception:
            report["modes"][name] = {"error": traceback.format_exc(limit=6)}
        report["modes"][name]["seconds"] = round(time.perf_counter() - start, 2)
    Path(report_path).write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- the mode tests


@pytest.fixture(scope="module")
def modes_report(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("modes") / "report.json"
    proc = subprocess.run([sys.executable, __file__, str(path)], cwd=ROOT, timeout=300,
                          env=cpu_devices_env(N_DEVICES), capture_output=True, text=True)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-4000:]
    return json.loads(path.read_text())


def _check_mode(report: dict[str, Any], name: str) -> dict[str, Any]:
    mode = report["modes"][name]
    assert "error" not in mode, mode["error"]
    for check in ("losses", "factors", "frozen_loss", "w_untouched"):
        assert mode[check] == "ok", (check, mode[check])
    assert mode["factor_change"] > 1e-3, "the steps must actually move the factors"
    hlo = mode["hlo"]
    assert hlo["bound"] < hlo["smallest_w_shard"], hlo
    big = [e for e in hlo["extra"] if math.prod(e[2]) > hlo["bound"]]
    assert not big, f"LoRA adds W-sized collectives the frozen step lacks: {big}\n{hlo}"
    return mode


@pytest.mark.parametrize("name", MODES)
def test_parallel_step_matches_single_device(modes_report, name):
    mode = _check_mode(modes_report, name)
    if name in MESHES:
        assert mode["factors_placed"], "factors not on their derived shardings"
    if name == "pmap":
        assert mode["replicas_equal"]


def test_lora_adds_collectives_only_where_parallelism_needs_them(modes_report):
    modes = modes_report["modes"]
    # Data parallel (jit, pmap, shard_map): the frozen step needs no parameter reduction, the
    # LoRA step must all-reduce its factor gradients, and nothing else.
    for name in ("dp", "pmap", "shard_map", "shard_map_pcast"):
        hlo = modes[name]["hlo"]
        assert hlo["extra"], f"{name}: factor gradients must be reduced"
        assert {e[0] for e in hlo["extra"]} <= {"all-reduce", "reduce-scatter"}, hlo["extra"]
    # FSDP: the frozen step all-gathers every W shard; LoRA gathers no W again, only its
    # (FSDP-sharded) factors.
    fsdp = modes["fsdp"]["hlo"]
    assert fsdp["frozen"]["count"].get("all-gather", 0) > 0
    gathered = fsdp["lora"]["elements"]["all-gather"] - fsdp["frozen"]["elements"]["all-gather"]
    factor_gathers = sum(math.prod(dims) * n for op, _, dims, n in fsdp["extra"]
                         if op == "all-gather")
    assert 0 < gathered <= factor_gathers, (gathered, factor_gathers)
    # Tensor parallel: a replicated next to column-sharded W, b replicated next to row-sharded
    # W, so LoRA gathers nothing; it only reduces rank-r partial sums and factor gradients.
    tp = modes["tp"]["hlo"]
    assert "all-gather" not in tp["lora"]["count"]
    assert {op for op, *_ in tp["extra"]} == {"all-reduce"}


def test_shard_map_with_default_check_vma(modes_report):
    _check_mode(modes_report, "shard_map_vma")


def test_collective_parser():
    hlo = "\n".join([
        "%w = f32[16,64]{1,0} parameter(0)",
        "%g = f32[16,2]{1,0} fusion(%w), kind=kLoop, calls=%f",
        "%ag = f32[64,64]{1,0} all-gather(%w), dimensions={0}, metadata={op_name=\"a(b)\"}",
        "%rs = f32[4,2]{1,0} reduce-scatter(%g), dimensions={0}, to_apply=%add",
        "  ROOT %ar = (f32[64,2]{1,0}, /*index=1*/f32[]) all-reduce(%g, %l), to_apply=%add",
        "%st = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), dimensions={0}",
        "%dn = f32[32]{0} all-gather-done(%st)",
        "%fusion = f32[8]{0} fusion(%x), kind=kLoop",
    ])
    assert collectives(hlo) == [
        ("all-gather", [("f32", (64, 64))]),
        ("reduce-scatter", [("f32", (16, 2))]),
        ("all-reduce", [("f32", (64, 2)), ("f32", ())]),
        ("all-gather", [("f32", (32,))]),
    ]
    assert collective_summary(hlo)["count"] == {"all-gather": 2, "reduce-scatter": 1,
                                                "all-reduce": 1}


# ----------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line.split(td.EVENT, 1)[1]) for line in log.read_text().splitlines()
            if line.startswith(td.EVENT)]


def _tail(log: Path, n: int = 3000) -> str:
    return f"--- {log.name}:\n" + (log.read_text()[-n:] if log.exists() else "(no log)")


class _Cluster:
    """Launches the processes of one job of experiments/train_distributed.py on 127.0.0.1."""

    def __init__(self, workdir: Path, argv: list[str]):
        self.workdir, self.argv, self.procs, self.logs = workdir, argv, [], []

    def start(self, tag: str, extra: dict[int, list[str]] | None = None) -> None:
        port = _free_port()
        self.procs, self.logs = [], []
        for i in range(2):
            log = self.workdir / f"{tag}-{i}.log"
            cmd = [sys.executable, "-m", "experiments.train_distributed",
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(i), *self.argv, *(extra or {}).get(i, [])]
            # A persistent compilation cache lets the restarted job skip recompiling; not from
            # jax 0.12, whose processes hang in the first collective of an executable loaded
            # from it (as does a two-process jitted sum without lorax; 0.11.2 and older do not).
            env = cpu_devices_env(2)
            if compat.JAX_VERSION < (0, 12, 0):
                env |= {"JAX_COMPILATION_CACHE_DIR": str(self.workdir / "xla"),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))
            self.logs.append(log)

    def wait_for(self, i: int, event: str, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            hits = [e for e in _events(self.logs[i]) if e["event"] == event]
            if hits:
                return hits[-1]
            if self.procs[i].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"process {i} never reported {event!r}\n" + self.tails())

    def wait_exit(self, i: int, deadline: float) -> int:
        try:
            return self.procs[i].wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {i} did not exit in time\n" + self.tails()) from None

    def tails(self) -> str:
        return "\n".join(_tail(log) for log in self.logs)

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process ignoring SIGKILL
                pass


def test_two_processes_train_lose_a_host_restart_and_restore(tmp_path):
    """2 processes x 2 CPU devices on one global Mesh(data=2, fsdp=2): both train; process 1
    holds after the step-3 checkpoint and is SIGKILLed while process 0 waits for it inside the
    step-4 collectives; JAX's health checking then aborts process 0. Both restart, restore step
    3 from the orbax checkpoint, finish at step 6, and the final adapters equal a single-process
    run's."""
    config = td.Config(steps=6, layers=1)
    ckpt = tmp_path / "ckpt"
    heartbeat = 5
    argv = ["--mesh", "data=2,fsdp=2", "--ckpt-dir", str(ckpt), "--steps", str(config.steps),
            "--layers", str(config.layers), "--save-every", "3",
            "--heartbeat-timeout", str(heartbeat), "--init-timeout", "60"]
    cluster = _Cluster(tmp_path, argv)
    t0 = time.monotonic()
    try:
        cluster.start("run1", extra={1: ["--hold-at", "3"]})
        cluster.wait_for(1, "hold", t0 + 80)
        while not (ckpt / "3").is_dir() and time.monotonic() < t0 + 85:  # committed by process 0
            time.sleep(0.1)
        cluster.procs[1].send_signal(signal.SIGKILL)
        assert cluster.wait_exit(1, time.monotonic() + 10) == -signal.SIGKILL
        # The survivor is blocked in a collective with the dead host; the distributed runtime
        # notices the missing heartbeats and terminates it.
        rc0 = cluster.wait_exit(0, time.monotonic() + heartbeat + 30)
        assert rc0 != 0, "process 0 finished although its peer died\n" + cluster.tails()
        first = [_events(log) for log in cluster.logs]
        assert not any(e["event"] == "done" for events in first for e in events)
        assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [3]

        cluster.start("run2")
        for i in range(2):
            assert cluster.wait_exit(i, t0 + 110) == 0, cluster.tails()
        second = [_events(log) for log in cluster.logs]
    finally:
        cluster.reap()
    for i, events in enumerate(second):
        start = next(e for e in events if e["event"] == "start")
        assert start == {"event": "start", "process": i, "devices": 4, "processes": 2,
                         "restored": 3}, start
        assert [e["step"] for e in events if e["event"] == "saved"] == [6]
    steps = [e["step"] for e in second[0] if e["event"] == "step"]
    assert steps == [4, 5, 6], steps
    checksums = {e["checksum"] for events in second for e in events if e["event"] == "done"}
    assert len(checksums) == 1

    # The single-process, single-device run of the same 6 steps.
    reference = td.train(config, td.make_mesh({"data": 1}, jax.devices()[:1]), log_every=0)
    restored = lorax.restore(ckpt, reference)
    # AdamW divides by each gradient entry's RMS, so the rounding of small gradient entries
    # (summed in another order over 2 processes x 2 devices) becomes a relative error of their
    # updates; over 6 steps the factors differ by up to ~150 eps of their scale (measured).
    factors = lorax.split(reference)[0]
    assert_close(lorax.split(restored)[0], factors, ulps=1024)
    # The checksum sums every factor: rounding relative to the sum of their magnitudes.
    magnitude = float(sum(np.abs(np.asarray(x, np.float64)).sum()
                          for x in jax.tree.leaves(factors)))
    assert_close(checksums.pop(), td.checksum(factors), dtype=np.float32, scale=magnitude)
    assert time.monotonic() - t0 < 120


if __name__ == "__main__":
    _modes_worker(sys.argv[1])

"""`lorax.compat`: the supported JAX range, and loud failures on parameter layouts it lacks.

Runs on every tested JAX (it is part of CI's core subset, run on the oldest and the newest): the
layouts
the installed JAX produces must pass :func:`lorax.compat.check_params`, and altered layouts (a
stand-in for an unknown future JAX) must raise :class:`lorax.compat.UnsupportedJaxError` naming
the primitive and the installed JAX version, both directly and through ``lorax.lora``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, dense_params, perturb_b
from jax import lax
from jax.extend.core import Var

import lorax
from lorax import compat, primitive_table

ROOT = Path(__file__).resolve().parents[1]


def _eqns(fn, *args) -> dict[str, Any]:
    """Every equation of ``fn``'s jaxpr, sub-jaxprs included, by primitive name (the first)."""
    out: dict[str, Any] = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.setdefault(eqn.primitive.name, eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def _everything(w, x):
    """One program with each primitive lorax interprets."""
    y = jax.jit(lambda a, b: a @ b)(x, w).sum()
    y = y + jax.checkpoint(lambda a: jnp.sin(a) @ w)(x).sum()
    y = y + jnp.reshape(w.T, (4, 2, 4)).astype(jnp.bfloat16).astype(jnp.float32).sum()
    y = y + lax.stop_gradient(jnp.copy(w)).sum() + jnp.take(w, jnp.array([0, 1]), axis=0).sum()
    y = y + (x[:, :4] @ w[0:1][0][:, None]).sum()  # slice, squeeze
    y = y + lax.dynamic_slice_in_dim(w, y.astype(int), 1).sum()
    y = y + lax.conv_general_dilated(x[None, None], w[None, None, :3, :3], (1, 1), "SAME").sum()
    carry, _ = lax.scan(lambda c, row: (c + row, None), jnp.zeros(4), w)
    y = y + lax.cond(x.sum() > 0, lambda: carry, lambda: -carry).sum()
    y = y + lax.while_loop(lambda v: v[0] < 3, lambda v: v + 1, jnp.zeros(4)).sum()
    y = y + lax.ragged_dot(x, w[None], jnp.array([3])).sum()
    passed = jax.custom_jvp(lambda v: v)
    passed.defjvp(lambda primals, tangents: (primals[0], tangents[0]))
    clipped = jax.custom_vjp(lambda v: v)
    clipped.defvjp(lambda v: (v, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))
    y = y + passed(w).sum() + clipped(w).sum()
    body = jax.make_jaxpr(jnp.sin)(y)  # closed_call has no public producer: bind it
    return compat.bind(jax.extend.core.primitives.closed_call_p, [y], {"call_jaxpr": body})[0]


W, X = jnp.ones((8, 4)), jnp.ones((3, 8))
EQNS = _eqns(_everything, W, X)


def test_installed_jax_is_at_least_the_oldest_tested():
    """pyproject sets lower bounds only: a jax newer than the newest tested installs as it is,
    and lorax runs on it as far as :data:`compat.PARAM_LAYOUTS` knows its primitives (else
    UnsupportedJaxError, below)."""
    assert compat.OLDEST_JAX <= compat.JAX_VERSION, jax.__version__
    assert compat.OLDEST_JAX < compat.NEWEST_JAX <= compat.NEWEST_KNOWN_JAX


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", path.read_text(), re.M))


def _requirements() -> dict[str, str]:
    """pyproject's runtime dependencies: name -> version specifier (``">=0.7.1"``)."""
    deps = re.search(r"dependencies = \[(.*?)\n\]", (ROOT / "pyproject.toml").read_text(), re.S)
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)([^"]*)"', deps.group(1), re.M))


def test_pyproject_has_lower_bounds_only():
    """Each dependency's only bound is ``>=`` .ci/oldest.txt's pin (an upper bound would make
    pip downgrade a newer JAX, and its CUDA plugin pairing with it); jax's is compat's oldest."""
    pins, requirements = _pins(ROOT / ".ci" / "oldest.txt"), _requirements()
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors"):
        assert requirements[name] == f">={pins[name]}", (name, requirements[name], pins[name])
    assert pins["jaxlib"] == pins["jax"]
    assert compat._version_tuple(pins["jax"]) == compat.OLDEST_JAX


#: Table entries whose parameters lorax never reads (markers applied to each array as they are).
UNREAD = {"pvary", "copy_p", "optimization_barrier", "sharding_constraint", "reduce_precision"}


def test_every_interpreted_primitive_has_a_layout():
    missing = sorted(set(primitive_table.TABLE) - UNREAD - set(compat.PARAM_LAYOUTS))
    assert not missing


#: The primitives lorax interprets, by their names on the installed JAX (``closed_call_p`` is
#: named ``eval_jaxpr`` after 0.11.0).
INTERPRETED = sorted(set(primitive_table.TABLE) - UNREAD
                     - ({"eval_jaxpr"} if compat.JAX_VERSION < (0, 11, 1) else set()))


@pytest.mark.parametrize("name", INTERPRETED)
def test_installed_layouts_are_understood(name):
    assert name in EQNS, sorted(EQNS)  # the program above has each primitive
    compat.check_params(EQNS[name].primitive, EQNS[name].params)


@pytest.mark.parametrize("name", INTERPRETED)
def test_installed_layouts_are_listed_for_the_installed_version(name):
    """The layout the installed JAX produces is one whose stated versions include it."""
    fits = [lay for lay in compat.PARAM_LAYOUTS[name] if not lay.problems(EQNS[name].params)]
    first, last = fits[0].versions
    assert first <= compat.JAX_VERSION and (last is None or compat.JAX_VERSION <= last), fits


def test_layout_versions_cover_the_known_range():
    """Each primitive's layouts, in order, cover the versions from the oldest tested to the
    newest known without a gap; the last one is open-ended (still current) unless the
    primitive was renamed (``closed_call``: ``eval_jaxpr`` after 0.11.0)."""
    for name, layouts in compat.PARAM_LAYOUTS.items():
        assert layouts[0].versions[0] == compat.OLDEST_JAX, name
        assert (layouts[-1].versions[1] is None) != (name == "closed_call"), name
        for before, after in zip(layouts, layouts[1:], strict=False):
            last, first = before.versions[1], after.versions[0]
            assert last is not None and last < first, (name, before, after)
            assert first[:2] == last[:2] and first[2] == last[2] + 1 or \
                first[:2] == (last[0], last[1] + 1) and first[2] == 0, (name, before, after)


def _scan_params_0_11(n_consts: int, n_carry: int, n_xs: int, n_ys: int) -> dict[str, Any]:
    """A jax 0.11 ``scan`` parameter dict (as its sources build it), with stand-in flat trees:
    ``ft_in`` packs (consts, carry, xs), ``ft_out`` (carry, ys)."""

    class Group:
        def __init__(self, n: int):
            self.n = n

        def __len__(self) -> int:
            return self.n

    class Packed:
        def __init__(self, *sizes: int):
            self.sizes = sizes

        def unpack(self) -> tuple[Group, ...]:
            return tuple(Group(n) for n in self.sizes)

    body = jax.make_jaxpr(lambda *a: a)(*[0.0] * (n_consts + n_carry + n_xs))
    return {"reverse": False, "length": 3, "jaxpr": body, "unroll": 1,
            "ft_in": Packed(n_consts, n_carry, n_xs), "ft_out": Packed(n_carry, n_ys)}


def test_scan_layout_of_jax_0_11_is_understood():
    """jax 0.11.0 replaced scan's ``num_consts``/``num_carry`` by flat trees of the operand
    groups (jax commit 08958bdf); the table accepts that layout and :func:`compat.scan_counts`
    reads the counts off it, as off the older one."""
    params = _scan_params_0_11(2, 1, 3, 1)
    compat.check_params("scan", params)
    assert compat.scan_counts(params) == (2, 1)
    old = {k: v for k, v in params.items() if not k.startswith("ft_")}
    assert compat.scan_counts({**old, "num_consts": 2, "num_carry": 1}) == (2, 1)
    compat.check_params("scan", {**old, "num_consts": 2, "num_carry": 1})
    # One of each layout's parameters, or both at once, is neither layout.
    msg = _raises_naming("scan", compat.check_params, "scan", {**params, "num_consts": 2})
    assert "unknown parameter 'num_consts'" in msg and "jax 0.11.0.." in msg, msg
    _raises_naming("scan", compat.check_params, "scan",
                   {k: v for k, v in params.items() if k != "ft_out"})
    installed = EQNS["scan"].params
    assert compat.scan_counts(installed) == (0, 1)  # `_everything`'s scan: carry c, xs w


def test_call_layouts_of_jax_0_11_are_understood():
    """After 0.11.0 ``closed_call_p`` is ``eval_jaxpr_p`` (body ``call_jaxpr``, jax commit
    99a9f6e7); before, ``eval_jaxpr``'s body was ``jaxpr``. Both are in the table, and
    :func:`compat.called_jaxpr` reads either."""
    body = jax.make_jaxpr(jnp.sin)(1.0)
    for params in ({"call_jaxpr": body}, {"jaxpr": body}):
        compat.check_params("eval_jaxpr", params)
        assert compat.called_jaxpr(params) is body
    compat.check_params("closed_call", {"call_jaxpr": body})
    _raises_naming("eval_jaxpr", compat.check_params, "eval_jaxpr", {"body": body})


def test_pvary_layout_is_understood():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    P = jax.sharding.PartitionSpec
    fn = jax.shard_map(lambda w: compat.pvary(w, "data"), mesh=mesh, in_specs=P(),
                       out_specs=P("data"))
    eqn = _eqns(fn, W)["pvary"]
    compat.check_params(eqn.primitive, eqn.params)


def test_remat_p_is_checkpoints_primitive():
    eqn = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0]
    assert eqn.primitive is compat.remat_p


def test_drop_var_is_a_jaxpr_variable_class():
    assert issubclass(compat.DropVar, Var)


def test_closed_jaxpr_is_what_make_jaxpr_returns():
    """A class of its own up to jax 0.10.2; ``Jaxpr`` itself from 0.11.0 (an alias there)."""
    closed = jax.make_jaxpr(jnp.sin)(1.0)
    assert isinstance(closed, compat.ClosedJaxpr)
    assert not isinstance(closed.jaxpr, compat.ClosedJaxpr) or closed.jaxpr is closed


def _raises_naming(name: str, fn, *args, **kwargs) -> str:
    with pytest.raises(compat.UnsupportedJaxError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert f"`{name}`" in message and f"jax {jax.__version__}" in message, message
    return message


def test_altered_layouts_fail_loudly():
    eqn = EQNS["dot_general"]
    ok = dict(eqn.params)
    msg = _raises_naming("dot_general", compat.check_params, eqn.primitive,
                         {**ok, "algorithm": "future"})
    assert "unknown parameter 'algorithm'" in msg
    missing = {k: v for k, v in ok.items() if k != "precision"}
    assert "no parameter 'precision'" in _raises_naming("dot_general", compat.check_params,
                                                         eqn.primitive, missing)
    bad = {**ok, "dimension_numbers": ((0,), (1,))}
    assert "dimension_numbers" in _raises_naming("dot_general", compat.check_params,
                                                  eqn.primitive, bad)
    scan = EQNS["scan"]
    counts = "ft_in" if "ft_in" in scan.params else "num_consts"  # from jax 0.11.0 / before
    renamed = {(f"{k}_renamed" if k == counts else k): v for k, v in scan.params.items()}
    _raises_naming("scan", compat.check_params, scan.primitive, renamed)
    # Primitives lorax never interprets are bound unchanged: any layout passes.
    compat.check_params("sin", {"whatever": 1})


def _altered_make_jaxpr(name: str, alter):
    """A ``jax.make_jaxpr`` whose jaxprs have ``alter(params)`` on each ``name`` equation."""
    original = jax.make_jaxpr

    def make_jaxpr(fn, *args, **kwargs):
        traced = original(fn, *args, **kwargs)

        def run(*a, **k):
            out = traced(*a, **k)
            closed, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            eqns = [e.replace(params=alter(dict(e.params))) if e.primitive.name == name else e
                    for e in closed.jaxpr.eqns]
            closed = closed.replace(jaxpr=closed.jaxpr.replace(eqns=eqns))
            return (closed, *rest) if rest else closed

        return run

    return make_jaxpr


@pytest.mark.parametrize("name, alter", [
    ("dot_general", lambda p: {**p, "future_flag": True}),
    ("dot_general", lambda p: {k: v for k, v in p.items() if k != "preferred_element_type"}),
    ("transpose", lambda p: {"perm": p["permutation"]}),
])
def test_lora_fails_loudly_on_an_unknown_layout(monkeypatch, name, alter):
    """Through ``lorax.lora``: the rule layer meets a layout no tested JAX produced."""
    lp = lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2)
    fn = lorax.lora(lambda p, x: x @ p["kernel"].T.T)
    expected = fn(lp, X)  # the unaltered program works
    monkeypatch.setattr(jax, "make_jaxpr", _altered_make_jaxpr(name, alter))
    _raises_naming(name, fn, lp, X)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(fn(lp, X)), np.asarray(expected))


class _FakePrimitive:
    name = "future_p"

    def get_bind_params(self, params):
        return [params]


def test_bind_fails_loudly_on_an_unknown_get_bind_params():
    _raises_naming("future_p.get_bind_params", compat.bind, _FakePrimitive(), [], {})


@pytest.mark.parametrize("primitive, closed", [
    (jax.extend.core.primitives.closed_call_p, True), (jax.extend.core.primitives.call_p, False)])
def test_bind_runs_call_primitives(primitive, closed):
    """A call primitive's body is a subfun: ``(subfuns, params)`` on jax 0.7.1 and 0.8.2, a
    parameter on 0.10.2; compat.bind binds it either way."""
    body = jax.make_jaxpr(jnp.sin)(1.0)
    (out,) = compat.bind(primitive, [jnp.float32(0.5)],
                         {"call_jaxpr": body if closed else body.jaxpr})
    assert_close(out, np.sin(0.5), ulps=2)


def test_lora_through_a_dropped_output():
    """eigh's unused eigenvectors are a DropVar on jax 0.7.1 (an ordinary Var on 0.10.2)."""
    lp = perturb_b(lorax.wrap({"kernel": jnp.eye(4) + jnp.ones((4, 4)) / 8}, rank=2),
                   jax.random.key(0))

    def fn(p, x):
        k = x @ p["kernel"]
        return jnp.linalg.eigh(k @ k.T)[0]

    x = jnp.eye(4)
    got = np.asarray(lorax.lora(fn)(lp, x))
    want = np.asarray(fn(dense_params(lp), x))
    assert_close(got, want)


def test_lora_inside_shard_map_with_default_check_vma():
    """shard_map (check_vma=True) inserts ``pvary`` on the replicated kernel: multiple-results
    on jax 0.7.1, unary later; the kernel must stay factorized (no fallback warning) either way.
    One device, so this runs in the ordinary test process."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    P = jax.sharding.PartitionSpec
    lp = perturb_b(lorax.wrap({"kernel": jnp.ones((8, 4)) / 8}, rank=2), jax.random.key(1))
    body = lorax.lora(lambda p, x: jnp.tanh(x @ p["kernel"]))
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
    assert "pvary" in _eqns(lambda p, x: jax.shard_map(
        lambda p, x: x @ p["kernel"], mesh=mesh, in_specs=(P(), P("data")),
        out_specs=P("data"))(p, x), {"kernel": W}, x)
    got = np.asarray(fn(lp, x))
    want = np.tanh(np.asarray(x, np.float64) @ dense_params(lp, np.float64)["kernel"])
    assert_close(got, want, ulps=16)
    grads = jax.grad(lambda t: fn(lorax.combine(t, lorax.split(lp)[1]), x).sum())(
        lorax.split(lp)[0])
    assert float(jnp.abs(lorax.split(grads)[0]["kernel"].a).sum()) > 0

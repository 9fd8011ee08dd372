"""Everything that differs across the supported JAX versions, in one place.

lorax is tested from jax 0.7.1 / flax 0.12.0 (pyproject.toml's lower bounds) to jax 0.12.1 /
flax 0.12.12, the newest the package index offered (README, "Supported versions"); pyproject sets
no upper bound, so a newer JAX installs as it is. The rest of the package imports
version-dependent names from here instead of from ``jax`` directly, and :func:`check_params`
guards every primitive whose parameters lorax reads: a parameter layout that no known JAX
produced raises :class:`UnsupportedJaxError` naming the primitive and the installed JAX version,
instead of computing something wrong. That refusal is what makes the open upper bound safe.

Differences handled here (as seen on jax 0.7.1, 0.8.2, 0.10.2, 0.11.2 and 0.12.1):

* ``jax.extend.core.DropVar`` exists from 0.10.2 on; before, ``jax.core.DropVar`` (removed
  from ``jax.core`` in 0.11.0).
* ``jax.extend.core.primitives.remat_p`` is missing on 0.7.1; the primitive is then read off
  the jaxpr of a ``jax.checkpoint``-ed function (still public API only).
* ``Primitive.get_bind_params`` returns ``(subfuns, params)`` on 0.7.1 and 0.8.2, one dict
  (subfuns inside) on 0.10.2 and 0.11: :func:`bind`.
* ``pvary`` (inserted by ``shard_map``'s default ``check_vma=True``; exported by none, so
  matched by name) is variadic (``multiple_results``) with an ``axis_index_groups`` parameter
  on 0.7.1, unary without it later: :func:`bind_each`, :func:`as_results`.
* ``lax.pcast(x, axes, to="varying")`` is missing on 0.7.1 and ``lax.pvary`` deprecated from
  0.8.2 on (removed in 0.10.0): :func:`pvary`.
* ``scan`` says how its operands split into constants, carry and scanned inputs with
  ``num_consts``/``num_carry`` up to 0.10.2, with ``ft_in``/``ft_out`` (flat trees of the three
  groups, and of carry and stacked outputs) from 0.11.0 (jax commit 08958bdf, "Use FlatTree to
  structure scan arguments"): :func:`scan_counts`.
* ``Jaxpr`` and ``ClosedJaxpr`` are one class from 0.11.0 (``ClosedJaxpr`` is an alias, to be
  removed: :data:`ClosedJaxpr`; a jaxpr carries its ``consts``, and ``.jaxpr`` returns itself);
  lorax only reads ``.jaxpr``, ``.consts``, ``.constvars`` and ``.invars``, which pair up the
  same way on both sides.
* ``closed_call_p`` (and ``call_p``) are aliases of the ``eval_jaxpr`` primitive after 0.11.0
  (jax commit 99a9f6e7, on ``main`` for 0.11.1), whose body is ``call_jaxpr``; ``eval_jaxpr``'s
  body was the parameter ``jaxpr`` before: :func:`called_jaxpr`.
* ``jax.sharding.SingleDeviceSharding`` is deprecated from 0.12.0 in favour of
  ``jax.sharding.make_single_device_sharding``, which 0.7.1 lacks: :func:`single_device_sharding`.
* Parameters present on part of the range (``scan``'s ``linear``/``_split_transpose`` up to
  0.8.2, ``conv_general_dilated``'s ``out_sharding`` from 0.8.2, ``gather``'s from 0.12.0) are
  listed in :data:`PARAM_LAYOUTS`, with the JAX versions that produce each layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend.core as _jex
from jax import lax
from jax.extend.core import primitives as prims

#: The tested range: pyproject.toml's lower bound on jax, and the newest jax CI has run the tests
#: on (the package index's newest when last checked; pyproject sets no upper bound).
OLDEST_JAX, NEWEST_JAX = (0, 7, 1), (0, 12, 1)

#: The newest JAX whose primitive parameters :data:`PARAM_LAYOUTS` describes (the newest tested).
NEWEST_KNOWN_JAX = NEWEST_JAX


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


#: The installed JAX version as a tuple, e.g. ``(0, 10, 2)``.
JAX_VERSION: tuple[int, ...] = _version_tuple(jax.__version__)


class UnsupportedJaxError(RuntimeError):
    """The installed JAX produced something lorax was not written (nor tested) for."""


# ------------------------------------------------------------------------------ jaxpr classes

#: ``jax.extend.core.ClosedJaxpr``: merged into ``Jaxpr`` from jax 0.11.0, where it is an alias
#: that jax means to remove (then ``Jaxpr`` itself, whose ``.jaxpr`` and ``.consts`` it has).
ClosedJaxpr: type = getattr(_jex, "ClosedJaxpr", _jex.Jaxpr)

if hasattr(_jex, "DropVar"):
    DropVar: type = _jex.DropVar
else:  # jax 0.7.1, 0.8.2: only in jax.core (not deprecated there)
    DropVar = jax.core.DropVar


# -------------------------------------------------------------------------------- primitives


def _traced_primitive(fn: Callable[[jax.Array], Any], name: str) -> Any:
    """The primitive of the single equation ``jax.make_jaxpr(fn)`` produces."""
    eqns = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((), jax.numpy.float32)).eqns
    if len(eqns) != 1:
        raise UnsupportedJaxError(
            f"lorax could not find the `{name}` primitive in jax {jax.__version__}: tracing it "
            f"gave {[e.primitive.name for e in eqns]}, not one equation"
        )
    return eqns[0].primitive


def _remat_primitive() -> Any:
    if hasattr(prims, "remat_p"):
        return prims.remat_p
    return _traced_primitive(jax.checkpoint(lambda x: x), "remat")


#: ``jax.checkpoint``'s primitive (``remat2``).
remat_p = _remat_primitive()


def bind(primitive: Any, invals: list[Any], params: Mapping[str, Any]) -> Any:
    """Binds ``primitive`` as a jaxpr equation with parameters ``params`` would be bound.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> eqn = jax.make_jaxpr(jnp.sin)(1.0).eqns[0]
        >>> float(bind(eqn.primitive, [jnp.float32(0.0)], eqn.params))
        0.0
    """
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, Mapping):  # jax 0.10.2: subfuns (if any) are a parameter
        return primitive.bind(*invals, **bind_params)
    if isinstance(bind_params, tuple) and len(bind_params) == 2:  # 0.7.1, 0.8.2: a pair
        subfuns, bind_params = bind_params
        return primitive.bind(*subfuns, *invals, **bind_params)
    raise UnsupportedJaxError(
        f"lorax does not understand what `{primitive.name}.get_bind_params` returns with the "
        f"installed jax {jax.__version__}: {type(bind_params).__name__}"
    )


def bind_each(primitive: Any, x: Any, params: Mapping[str, Any]) -> Any:
    """Binds a primitive that maps each operand on its own (``pvary``) to the one array ``x``.

    ``pvary`` is variadic (``multiple_results``) on jax 0.7.1 and unary later; either way the
    result is one array.

    Example:
        >>> import jax.numpy as jnp
        >>> from jax.extend.core import primitives as prims
        >>> bind_each(prims.copy_p, jnp.ones(2), {}).tolist()
        [1.0, 1.0]
    """
    out = primitive.bind(x, **params)
    return out[0] if primitive.multiple_results else out


def as_results(primitive: Any, outs: list[Any]) -> Any:
    """``outs`` (one per operand) as the interpreter expects ``primitive``'s result: the list
    for a ``multiple_results`` primitive, else its one element."""
    if primitive.multiple_results:
        return list(outs)
    (out,) = outs
    return out


def single_device_sharding(device: Any) -> Any:
    """The sharding that places an array whole on ``device``.

    ``jax.sharding.make_single_device_sharding`` where it exists (it is missing on jax 0.7.1),
    else the ``SingleDeviceSharding`` class, deprecated from 0.12.0.

    Example:
        >>> import jax
        >>> single_device_sharding(jax.devices()[0]).device_set == {jax.devices()[0]}
        True
    """
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(device)
    return jax.sharding.SingleDeviceSharding(device)


def pvary(x: Any, axis_name: str | tuple[str, ...]) -> Any:
    """Marks ``x`` device-varying over ``axis_name`` inside ``shard_map`` (``check_vma=True``).

    ``lax.pcast(x, axis_name, to="varying")`` where it exists, else (jax 0.7.1) ``lax.pvary``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
        >>> f = jax.shard_map(lambda w: pvary(w, "data"), mesh=mesh, in_specs=P(),
        ...                   out_specs=P("data"))
        >>> f(jnp.ones(2)).tolist()
        [1.0, 1.0]
    """
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axis_name, to="varying")
    return lax.pvary(x, axis_name)


# --------------------------------------------------------------- reading version-dependent params


def scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation: how many of its leading operands are
    loop constants and how many the carry (the rest are scanned over).

    ``num_consts``/``num_carry`` up to jax 0.10.2; from 0.11.0 ``ft_in``, a flat tree of the
    three operand groups (constants, carry, scanned inputs) whose lengths are the counts.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> step = lambda c, x: (c + x, c * x)
        >>> eqn = jax.make_jaxpr(lambda w: jax.lax.scan(step, w[0], w))(jnp.ones((3, 2))).eqns[-1]
        >>> scan_counts(eqn.params)
        (0, 1)
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    groups = params["ft_in"].unpack()
    if len(groups) != 3:  # not (consts, carry, xs): a layout lorax does not know
        raise UnsupportedJaxError(
            f"lorax does not understand `scan`'s `ft_in` ({len(groups)} groups, not 3) with the "
            f"installed jax {jax.__version__}"
        )
    return len(groups[0]), len(groups[1])


def called_jaxpr(params: Mapping[str, Any]) -> Any:
    """The body (a closed jaxpr) of a call primitive: ``closed_call``, ``eval_jaxpr``.

    ``call_jaxpr``; ``eval_jaxpr`` named it ``jaxpr`` up to jax 0.11.0 (later ``closed_call_p``
    is ``eval_jaxpr``, with ``call_jaxpr``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> body = jax.make_jaxpr(jnp.sin)(1.0)
        >>> called_jaxpr({"jaxpr": body}) is called_jaxpr({"call_jaxpr": body}) is body
        True
    """
    return params["call_jaxpr"] if "call_jaxpr" in params else params["jaxpr"]


# ------------------------------------------------------------------- primitive parameter layouts


def _dot_numbers(dn: Any) -> bool:
    try:
        (lc, rc), (lb, rb) = dn
        return all(isinstance(d, (tuple, list)) for d in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        return False


def _has(*fields: str) -> Callable[[Any], bool]:
    return lambda value: all(hasattr(value, f) for f in fields)


_closed = _has("jaxpr", "consts")
_open = _has("eqns", "invars", "outvars")
_int = lambda value: isinstance(value, int)  # noqa: E731


def _jaxprs(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(_closed(b) for b in value)


def _flat_tree(groups: int) -> Callable[[Any], bool]:
    """A jax ``FlatTree`` (0.11 on) packing ``groups`` operand groups, each with a length."""
    def check(value: Any) -> bool:
        try:
            parts = value.unpack()
            return len(parts) == groups and all(isinstance(len(p), int) for p in parts)
        except (AttributeError, TypeError, ValueError, AssertionError):
            return False

    return check


def _text(version: tuple[int, ...] | None) -> str:
    return "" if version is None else ".".join(map(str, version))


class Layout:
    """The parameters of one primitive that lorax understands, as some JAX versions produce them.

    Args:
        required: parameter name -> a check of its value (``None``: any value); each must be
            present.
        optional: parameters that some JAX versions have and lorax may ignore or pass on.
        open_ended: other, unknown parameters are allowed too (for call-like primitives whose
            extra parameters only concern compilation, e.g. ``jit``'s shardings and name).
        versions: ``(first, last)``, the JAX versions that produce this layout (``last=None``:
            still the newest known). Informational: :func:`check_params` accepts any listed
            layout of a primitive (none reuses a parameter name with another meaning), and
            names the versions in its error.
    """

    def __init__(self, required: Mapping[str, Callable[[Any], bool] | None],
                 optional: tuple[str, ...] = (), open_ended: bool = False,
                 versions: tuple[tuple[int, ...], tuple[int, ...] | None] = (OLDEST_JAX, None)):
        self.required = dict(required)
        self.optional = frozenset(optional)
        self.open_ended = open_ended
        self.versions = versions

    def problems(self, params: Mapping[str, Any]) -> list[str]:
        """What in ``params`` does not fit (empty when it fits)."""
        out = [f"no parameter {k!r}" for k in self.required if k not in params]
        out += [f"parameter {k!r} = {params[k]!r} is not of the expected form"
                for k, check in self.required.items()
                if k in params and check is not None and not check(params[k])]
        if not self.open_ended:
            known = set(self.required) | self.optional
            out += [f"unknown parameter {k!r}" for k in sorted(set(params) - known)]
        return out

    def __repr__(self) -> str:
        first, last = self.versions
        return f"Layout({sorted(self.required)}, jax {_text(first)}..{_text(last)})"


#: ``scan`` up to jax 0.10.2 and from 0.11.0 (the operand groups as flat trees).
_SCAN_COMMON = {"jaxpr": _closed, "length": _int, "reverse": None, "unroll": None}

#: The parameter layouts lorax reads, by primitive name: each entry lists what the known JAX
#: versions produce (jax 0.7.1 to 0.12.1). Primitives not listed are only ever bound unchanged.
PARAM_LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "dot_general": (Layout({"dimension_numbers": _dot_numbers, "precision": None,
                            "preferred_element_type": None}, ("out_sharding",)),),
    "conv_general_dilated": (Layout(
        {"dimension_numbers": _has("lhs_spec", "rhs_spec", "out_spec"),
         "feature_group_count": _int, "batch_group_count": _int, "window_strides": None,
         "padding": None, "lhs_dilation": None, "rhs_dilation": None, "precision": None,
         "preferred_element_type": None},
        ("out_sharding",)),),  # from jax 0.8.2
    "gather": (Layout(
        {"dimension_numbers": _has("offset_dims", "collapsed_slice_dims", "start_index_map",
                                   "operand_batching_dims"),
         "slice_sizes": None},
        ("indices_are_sorted", "unique_indices", "mode", "fill_value",
         "out_sharding")),),  # out_sharding: from jax 0.12.0
    "ragged_dot_general": (Layout(
        {"ragged_dot_dimension_numbers": _has("dot_dimension_numbers", "lhs_ragged_dimensions",
                                              "rhs_group_dimensions"),
         "precision": None, "preferred_element_type": None},
        ("group_offset", "out_sharding")),),  # out_sharding: from jax 0.8.2
    "transpose": (Layout({"permutation": None}),),
    "convert_element_type": (Layout({"new_dtype": None}, ("weak_type", "sharding")),),
    "reshape": (Layout({"new_sizes": None, "dimensions": None}, ("sharding",)),),
    "slice": (Layout({"start_indices": None, "limit_indices": None, "strides": None}),),
    "dynamic_slice": (Layout({"slice_sizes": None}),),
    "squeeze": (Layout({"dimensions": None}),),
    "copy": (Layout({}),),
    "stop_gradient": (Layout({}),),
    "pvary": (Layout({"axes": None}, ("axis_index_groups",)),),  # axis_index_groups: 0.7.1
    "jit": (Layout({"jaxpr": _closed}, open_ended=True),),  # `inline`: an enum from 0.11.0
    "closed_call": (Layout({"call_jaxpr": _closed}, open_ended=True,
                           versions=(OLDEST_JAX, (0, 11, 0))),),
    # `closed_call_p` is `eval_jaxpr_p` after 0.11.0; before, eval_jaxpr's body was `jaxpr`.
    "eval_jaxpr": (Layout({"jaxpr": _closed}, versions=(OLDEST_JAX, (0, 11, 0))),
                   Layout({"call_jaxpr": _closed}, open_ended=True, versions=((0, 11, 1), None))),
    "remat2": (Layout({"jaxpr": _open, "prevent_cse": None, "policy": None},
                      ("differentiated",)),),
    "scan": (Layout({**_SCAN_COMMON, "num_consts": _int, "num_carry": _int},
                    ("linear", "_split_transpose"),  # both: up to jax 0.8.2
                    versions=(OLDEST_JAX, (0, 10, 2))),
             Layout({**_SCAN_COMMON, "ft_in": _flat_tree(3), "ft_out": _flat_tree(2)},
                    versions=((0, 11, 0), None))),
    "cond": (Layout({"branches": _jaxprs}),),
    "custom_jvp_call": (Layout({"call_jaxpr": _closed}, open_ended=True),),
    "custom_vjp_call": (Layout({"call_jaxpr": _closed}, open_ended=True),),
    "while": (Layout({"cond_jaxpr": _closed, "body_jaxpr": _closed, "cond_nconsts": _int,
                      "body_nconsts": _int}),),
}


def check_params(primitive: Any, params: Mapping[str, Any]) -> None:
    """Raises :class:`UnsupportedJaxError` if lorax does not understand ``params``.

    Args:
        primitive: a JAX primitive (or its name).
        params: the equation's parameters.

    Raises:
        UnsupportedJaxError: naming the primitive, what does not fit, and the installed JAX
            version, when ``params`` matches none of the primitive's :data:`PARAM_LAYOUTS`
            (primitives not listed there pass).

    Example:
        >>> check_params("transpose", {"permutation": (1, 0)})
        >>> check_params("transpose", {"perm": (1, 0)})
        Traceback (most recent call last):
        ...
        lorax.compat.UnsupportedJaxError: lorax does not understand the parameters of the JAX \
primitive `transpose` (no parameter 'permutation'; unknown parameter 'perm') ...
    """
    name = getattr(primitive, "name", primitive)
    layouts = PARAM_LAYOUTS.get(name)
    if layouts is None:
        return
    problems = [layout.problems(params) for layout in layouts]
    if all(problems):
        if len(layouts) == 1:
            why = "; ".join(problems[0])
        else:
            why = " / ".join(
                f"as on jax {_text(lay.versions[0])}..{_text(lay.versions[1])}: {'; '.join(p)}"
                for lay, p in zip(layouts, problems, strict=True))
        oldest, newest = (_text(v) for v in (OLDEST_JAX, NEWEST_JAX))
        newer = f", newer than {newest}," if JAX_VERSION > NEWEST_JAX else ""
        raise UnsupportedJaxError(
            f"lorax does not understand the parameters of the JAX primitive `{name}` "
            f"({why}) with the installed jax {jax.__version__}{newer}; lorax is tested with "
            f"jax {oldest} to {newest}. Install a jax in the tested range, or report this at "
            "lorax's issue tracker with your jax version."
        )

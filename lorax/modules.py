"""NNX modules: `lorax.wrap(module)` gives a module whose factors are ``nnx.LoRAParam`` variables.

The wrapped module is a copy of the user's module with the same structure. Each module that owns
an adapted kernel (an ``nnx.Linear``, ``nnx.Einsum``, ``nnx.Embed`` or a user's own module
holding an ``nnx.Param`` it multiplies with) gets

* its factors as ``nnx.LoRAParam`` attributes beside the kernel: ``kernel_lora_a``
  ``(*stack, *in, r)`` and ``kernel_lora_b`` ``(*stack, r, *out)`` (``_lora_magnitude`` with
  DoRA, ``_lora_<name>_a`` / ``_b`` for named adapters); the kernel itself stays the
  ``nnx.Param`` it was, bit for bit;
* a class of its own, a subclass of its class (``isinstance`` holds), whose methods run the
  original methods through :func:`lorax.lora` on that module alone. Inside, the kernel is a
  LoRA node, so every product that consumes it is computed factorized, ``x·W + s·(x·A)·B``,
  by the one interpreter the functional path uses; nothing full-size is formed.

Because the interpretation happens at the module that owns the kernel, whatever calls it
(the user's ``__call__``, ``generate``, an ``nnx.scan`` over a stack of blocks, ``nnx.remat``,
``nnx.jit``, ``nnx.value_and_grad``) sees an ordinary NNX module: train with
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, differentiate with
``argnums=nnx.DiffState(0, nnx.LoRAParam)``. State that the methods update (batch statistics,
RNG counters, caches) is written back as the original methods would.

:func:`module_tree` and :func:`rebuild` convert between the module and the functional form (an
``nnx.State`` of ``nnx.Param`` whose adapted kernels are :class:`lorax.LoRA` nodes, exactly what
``lorax.wrap(nnx.state(base, nnx.Param))`` gives); ``merge``, ``save``/``restore``, PEFT
export, ``summary``, named adapters and ``quantize`` accept modules through them.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lorax import interpreter
from lorax.node import FullyTrained, is_node
from lorax.paths import path_str

_SPECS = "lorax_adapted"  # the static attribute of an owner that lists its adapted kernels


def is_module(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX module (without importing flax when it is not loaded)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Module)


@dataclasses.dataclass(frozen=True)
class AdaptedAttr:
    """How one kernel attribute of an owner module is adapted (static, hashable).

    Attributes:
        attr: the kernel's attribute name (``"kernel"``).
        template: the node's structure without its arrays (``jax.tree.structure`` of the node
            with ``w=None``): LoRA, DoRA or named adapters, with their static settings.
        factors: the owner's attribute names of the node's arrays other than ``w``, in the
            template's leaf order (``("kernel_lora_a", "kernel_lora_b")``).
        ndim: the kernel's number of axes when it was wrapped; a call inside
            ``nnx.scan``/``nnx.vmap`` over a stack sees fewer.
        trained: a ``train=`` leaf (no factors: the variable itself is an ``nnx.LoRAParam``).
        dropout: whether the adapter has LoRA dropout (the owner then holds
            ``lora_dropout_key``/``lora_dropout_count`` and honours ``deterministic``).
    """

    attr: str
    template: Any
    factors: tuple[str, ...]
    ndim: int
    trained: bool = False
    dropout: bool = False


def _factor_names(attr: str, node: Any) -> tuple[list[str], list[Any], Any]:
    """Attribute names, arrays and structure of ``node``'s arrays other than ``w``."""
    rest = dataclasses.replace(node, w=None)
    flat, treedef = jax.tree_util.tree_flatten_with_path(rest)
    names = []
    for keypath, _ in flat:
        parts = [p for p in path_str(keypath).split("/") if p != "adapters"]
        names.append(f"{attr}_lora_" + "_".join(parts))
    return names, [x for _, x in flat], treedef


# ----------------------------------------------------------------------------- the owner class

_CLASSES: dict[type, type] = {}
_BASE_MODE: set[int] = set()  # ids of owner copies a trace is running the base methods on


def _public_methods(cls: type) -> list[str]:
    """``__call__`` and the public methods ``cls`` defines below ``nnx.Module``."""
    from flax import nnx

    names = []
    for klass in cls.__mro__:
        if klass is nnx.Module or not issubclass(klass, nnx.Module):
            continue
        for name, value in vars(klass).items():
            if (name == "__call__" or not name.startswith("_")) and callable(value) and \
                    not isinstance(value, (staticmethod, classmethod, type)) and \
                    name not in names and (name == "__call__" or not hasattr(nnx.Module, name)):
                names.append(name)
    return names


def adapted_class(cls: type) -> type:
    """The subclass of ``cls`` whose methods run through :func:`lorax.lora` (cached)."""
    if getattr(cls, "_lorax_base", None) is not None:
        return cls
    if cls not in _CLASSES:
        body: dict[str, Any] = {"_lorax_base": cls, "__module__": cls.__module__,
                                "__qualname__": f"LoRA{cls.__qualname__}",
                                "__doc__": f"{cls.__name__} with LoRA kernels (lorax.wrap)."}
        for name in _public_methods(cls):
            body[name] = _interpreted_method(cls, name)
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (cls,), body)
    return _CLASSES[cls]


def base_class(cls: type) -> type:
    """The user's class behind an :func:`adapted_class` (``cls`` itself otherwise)."""
    return getattr(cls, "_lorax_base", None) or cls


def _interpreted_method(cls: type, name: str) -> Callable[..., Any]:
    method = getattr(cls, name)

    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        if id(self) in _BASE_MODE:
            return method(self, *args, **kwargs)
        return _run_adapted(self, method, args, kwargs)

    return run


class _Node:
    """Stands for the i-th NNX graph node among a method's arguments while it is traced."""

    def __init__(self, index: int):
        self.index = index


def _run_adapted(owner: Any, method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``method(owner, *args, **kwargs)`` with ``owner``'s kernels as LoRA nodes."""
    from flax import nnx
    from flax.nnx import graph as nnx_graph

    found: list[Any] = []

    def slot(x: Any) -> Any:
        if nnx_graph.is_graph_node(x):
            found.append(x)
            return _Node(len(found))
        return x

    args, kwargs = jax.tree.map(slot, (args, kwargs), is_leaf=nnx_graph.is_graph_node)
    graph = (owner, *found)
    graphdef, state = nnx.split(graph)
    own = state[0]
    lora_key = None
    for spec in getattr(owner, _SPECS, ()):
        variable = own[spec.attr]
        node = _node(spec, variable.get_value(), [own[f].get_value() for f in spec.factors],
                     type(owner).__name__)
        own[spec.attr] = variable.replace(node)
        for name in spec.factors:  # the node carries them; the copies the method sees are unused
            own[name] = own[name].replace(jax.lax.stop_gradient(own[name].get_value()))
        if spec.dropout and lora_key is None and not getattr(owner, "deterministic", False):
            lora_key = _next_dropout_key(owner)

    def fn(tree: Any, call_args: tuple, call_kwargs: dict) -> Any:
        me, *others = nnx.merge(graphdef, tree)
        call_args, call_kwargs = jax.tree.map(
            lambda x: others[x.index - 1] if isinstance(x, _Node) else x,
            (call_args, call_kwargs), is_leaf=lambda x: isinstance(x, _Node))
        _BASE_MODE.add(id(me))
        try:
            out = method(me, *call_args, **call_kwargs)
        finally:
            _BASE_MODE.discard(id(me))
        return out, nnx.state((me, *others), nnx.Not(nnx.Param))

    try:
        out, updates = interpreter.call(fn, (state, args, kwargs), {}, lora_key)
    except TypeError as err:  # a method that returns no arrays (a string, a module) runs as is
        if "is not a valid JAX type" not in str(err):
            raise
        return method(owner, *args, **kwargs)
    nnx.update(graph, updates)
    return out


def _node(spec: AdaptedAttr, w: Any, factors: list[Any], where: str) -> Any:
    """The node of ``spec`` over ``w`` and the factor values, its leading stack axes cut to
    those the call sees (``nnx.scan`` over a stack of blocks slices the kernel and factors)."""
    if spec.trained:
        return FullyTrained(w)
    node = dataclasses.replace(jax.tree.unflatten(spec.template, factors), w=w)
    cut = spec.ndim - jnp.ndim(w)
    if cut == 0:
        return node
    layout = node.layout
    if not 0 < cut <= node.n_stack or (layout is not None and layout[:cut] != "s" * cut):
        raise ValueError(
            f"the LoRA kernel {spec.attr!r} of {where} was wrapped with shape of {spec.ndim} "
            f"axes ({node.n_stack} of them stack axes), but a call sees it with shape "
            f"{tuple(jnp.shape(w))}; wrap the module with the layout it is called with "
            f"(axes=... or stacked=... for {node.path!r})")
    return dataclasses.replace(node, n_stack=node.n_stack - cut,
                               layout=None if layout is None else layout[cut:])


def _next_dropout_key(owner: Any) -> jax.Array:
    """A fresh LoRA dropout key from the owner's key and counter (the counter advances)."""
    key_var, count_var = owner.lora_dropout_key, owner.lora_dropout_count
    key, count = key_var.get_value(), count_var.get_value()
    first_key = jnp.reshape(key, (-1,))[0] if jnp.ndim(key) else key
    first_count = jnp.reshape(count, (-1,))[0] if jnp.ndim(count) else count
    count_var.set_value(count + 1)
    return jax.random.fold_in(first_key, first_count)


# --------------------------------------------------------------------- module <-> functional tree

def _owner(module: Any, parts: tuple[Any, ...]) -> Any:
    node = module
    for part in parts:
        node = node[part] if not isinstance(part, str) or not hasattr(node, part) else \
            getattr(node, part)
    return node


def _state_parts(keypath: tuple) -> tuple[Any, ...]:
    """The attribute/item keys of a State key path (the Variable's ``.value`` dropped)."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(key.idx)
    return tuple(parts)


def _owners(module: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, module)`` for every owner of adapted kernels under ``module``."""
    from flax import nnx

    return [(tuple(path), node) for path, node in nnx.iter_graph(module)
            if getattr(node, _SPECS, ())]


def module_tree(module: Any) -> Any:
    """The functional form of a wrapped module: its ``nnx.Param`` state with each adapted
    kernel as a :class:`lorax.LoRA` (or named-adapter) node, each ``train=`` leaf boxed as
    :class:`lorax.FullyTrained`, and no separate factor variables.

    It is what ``lorax.wrap(nnx.state(base, nnx.Param))`` gives, so every function of wrapped
    trees (``lorax.save``, ``lorax.peft.save``, ``lorax.summary``, ``lorax.merge``) reads it.

    Example:
        >>> import lorax
        >>> from flax import nnx
        >>> model = lorax.wrap(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2)
        >>> tree = module_tree(model)
        >>> tree["kernel"].get_value().a.shape, "kernel_lora_a" in tree
        ((4, 2), False)
    """
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    for path, owner in _owners(module):
        own = state
        for part in path:
            own = own[part]
        for spec in getattr(owner, _SPECS):
            variable = own[spec.attr]
            factors = [own[name].get_value() for name in spec.factors]
            node = _node(spec, variable.get_value(), factors, type(owner).__name__)
            for name in spec.factors:
                del own[name]
            own[spec.attr] = nnx.Param(node) if spec.trained else variable.replace(node)
    return state


def rebuild(module: Any, tree: Any, *, key: jax.Array | None = None) -> Any:
    """A copy of ``module`` (wrapped or not) whose ``nnx.Param`` values come from ``tree``, a
    functional tree in :func:`module_tree`'s form: its nodes become the copy's adapters (plain
    arrays leave a kernel plain), its other leaves the copy's parameter values.

    Example:
        >>> import lorax
        >>> from flax import nnx
        >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> tree = lorax.wrap(nnx.state(base, nnx.Param), rank=2)
        >>> type(rebuild(base, tree)).__name__
        'LoRALinear'
    """
    from flax import nnx

    model = _stripped(nnx.clone(module))
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    plain, nodes = [], []
    for keypath, leaf in flat:
        (nodes if is_node(leaf) else plain).append((_state_parts(keypath), leaf))
    for parts, value in plain:
        _owner(model, parts[:-1]).__getattribute__(parts[-1]).set_value(value)
    seed = jax.random.key(0) if key is None else key
    for parts, node in nodes:
        _install(model, parts, node, seed)
    return model


def _stripped(model: Any) -> Any:
    """``model`` (a private copy) with every adapter removed, in place."""
    from flax import nnx

    for _, owner in _owners(model):
        for spec in getattr(owner, _SPECS):
            for name in spec.factors:
                delattr(owner, name)
            if spec.trained:
                setattr(owner, spec.attr, nnx.Param(getattr(owner, spec.attr).get_value()))
            if spec.dropout:
                for name in ("lora_dropout_key", "lora_dropout_count"):
                    if hasattr(owner, name):
                        delattr(owner, name)
        delattr(owner, _SPECS)
        object.__setattr__(owner, "__class__", base_class(type(owner)))
    return model


def _install(model: Any, parts: tuple[Any, ...], node: Any, seed: jax.Array) -> None:
    """Makes the kernel at ``parts`` of ``model`` the adapted kernel ``node`` (in place)."""
    from flax import nnx

    owner, attr = _owner(model, parts[:-1]), parts[-1]
    where = "/".join(map(str, parts))
    if not isinstance(owner, nnx.Module) or not isinstance(attr, str):
        raise TypeError(f"expected the adapted kernel at {where!r} to be an attribute of an "
                        f"nnx.Module, got an entry of {type(owner).__name__}; adapt the module "
                        "that multiplies with it instead (targets=/exclude=)")
    variable = getattr(owner, attr)
    if isinstance(node, FullyTrained):
        setattr(owner, attr, nnx.LoRAParam(node.value))
        spec = AdaptedAttr(attr, None, (), 0, trained=True)
    else:
        if node.w is not variable.get_value():  # PiSSA's residual, a quantized kernel
            variable.set_value(node.w)
        names, arrays, template = _factor_names(attr, node)
        for name, array in zip(names, arrays, strict=True):
            if hasattr(owner, name):
                raise ValueError(f"expected no attribute {name!r} on the module at "
                                 f"{where.rsplit('/', 1)[0] or 'the top'!r} (lorax puts the "
                                 f"factors of {attr!r} there), got one")
            setattr(owner, name, nnx.LoRAParam(array))
        spec = AdaptedAttr(attr, template, tuple(names), len(node.shape),
                           dropout=node.dropout > 0)
        if spec.dropout and not hasattr(owner, "lora_dropout_key"):
            stack = tuple(node.stack_shape)
            key = jax.random.fold_in(seed, zlib.crc32(where.encode()))
            owner.lora_dropout_key = nnx.RngKey(jax.random.split(key, stack) if stack else key)
            owner.lora_dropout_count = nnx.RngCount(jnp.zeros(stack, jnp.uint32))
            if not hasattr(owner, "deterministic"):
                owner.deterministic = False
    setattr(owner, _SPECS, (*getattr(owner, _SPECS, ()), spec))
    object.__setattr__(owner, "__class__", adapted_class(type(owner)))


def wrap_module(module: Any, wrap_state: Callable[[Any], Any], key: jax.Array | None) -> Any:
    """:func:`lorax.wrap` of an NNX module: ``wrap_state`` wraps its ``nnx.Param`` state."""
    from flax import nnx

    if any(True for _ in _owners(module)) or jax.tree.leaves(nnx.state(module, nnx.LoRAParam)):
        raise ValueError("expected `params` without LoRA factors, got an NNX module that already "
                         "has nnx.LoRAParam variables; call lorax.unwrap (or lorax.merge) first")
    return rebuild(module, wrap_state(nnx.state(module, nnx.Param)), key=key)


def on_modules(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Lets a function of wrapped trees that returns a tree (``lorax.merge``, ``add_adapter``,
    ``quantize``, ...) take a module as its first argument: it then runs on the module's
    functional tree (module arguments after it likewise) and returns a module rebuilt from
    the result (:func:`rebuild`)."""

    @functools.wraps(fn)
    def run(tree: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_module(tree):
            return fn(tree, *args, **kwargs)
        args = tuple(as_tree(x) for x in args)
        kwargs = {name: as_tree(x) for name, x in kwargs.items()}
        return rebuild(tree, fn(module_tree(tree), *args, **kwargs))

    return run


def as_tree(x: Any) -> Any:
    """The functional tree of a wrapped module; any other value as it is."""
    return module_tree(x) if is_module(x) else x


def graph_state(x: Any) -> Any:
    """The state of an NNX object (an ``nnx.Optimizer``) as a plain nested dict of arrays, for
    orbax; any other value as it is."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(x, nnx.Pytree):
        return x
    return nnx.to_pure_dict(nnx.state(x))


def with_graph_state(like: Any, values: Any) -> Any:
    """A copy of the NNX object ``like`` holding ``values`` (:func:`graph_state`'s form); any
    other ``like`` gives ``values``."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(like, nnx.Pytree) or values is None:
        return values
    copy = nnx.clone(like)
    state = nnx.state(copy)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(copy, state)
    return copy

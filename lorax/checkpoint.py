"""Adapter-only checkpoints with orbax: validated on restore, atomic, sharding-aware.

Only the trainable half of a wrapped tree (LoRA factors and ``train`` leaves) goes to disk,
together with a JSON description of every adapted kernel (rank, scale, axes, dtypes) and a
fingerprint of the frozen base (paths, shapes, dtypes). Restoring checks that description
against the tree it restores into and reports every mismatch at once.

Each save is an orbax step directory (``<directory>/<step>``), written to a temporary name and
renamed when complete, so a process killed mid-save leaves earlier steps intact and the
half-written one invisible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from lorax import compat, modules
from lorax.node import FullyTrained, LoRA, is_adapted, is_array_like, is_node
from lorax.partition import check_whole, combine, split
from lorax.paths import check_tree, path_str
from lorax.sharding import node_specs
from lorax.state_paths import layout_mismatch, leaf_layout
from lorax.version import __version__

FORMAT = 1
_ADAPTERS, _META, _OPT, _EXTRA, _DATA = "adapters", "lorax", "opt_state", "extra", "data"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the tree it is restored into (every mismatch is listed)."""


def _spec(x: Any) -> list:
    return [list(x.shape), str(np.dtype(x.dtype))]


def describe(tree: Any) -> dict[str, Any]:
    """The JSON metadata saved beside the adapters of ``tree``.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> meta = describe(lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2))
        >>> meta["kernels"]["kernel"]["rank"], meta["kernels"]["kernel"]["a"]
        (2, [[4, 2], 'float32'])
    """
    kernels, trained, base = {}, {}, {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        path = path_str(keypath)
        if is_adapted(leaf):  # named adapters (MultiLoRA): one entry per name, `path[name]`
            for suffix, f in leaf.named_factors():
                entry = kernels[path + suffix] = {
                    "rank": f.rank, "scale": f.scale, "n_stack": leaf.n_stack, "n_in": leaf.n_in,
                    "dropout": leaf.dropout, "a": _spec(f.a), "b": _spec(f.b)}
                if f.magnitude is not None:  # DoRA; plain LoRA metadata is unchanged
                    entry["magnitude"] = _spec(f.magnitude)
                if f.residual:  # PiSSA: the factors belong to the residual base, not W
                    entry["residual"] = True
                if not leaf.is_canonical:  # axes in another order than (*stack, *in, *out)
                    entry["layout"] = leaf.roles
            base[path] = _spec(leaf.w)
        elif isinstance(leaf, FullyTrained):
            trained[path] = _spec(leaf.value)
        elif is_array_like(leaf):
            base[path] = _spec(leaf)
    digest = hashlib.sha256(json.dumps(sorted(base.items())).encode()).hexdigest()
    return {"format": FORMAT, "lorax_version": __version__, "kernels": kernels,
            "trained": trained, "base": base, "base_fingerprint": digest}


def _mismatches(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    problems = []
    for section, what in (("kernels", "adapter"), ("trained", "train leaf"), ("base", "base")):
        have, want = saved.get(section, {}), expected[section]
        if section == "base" and saved.get("base_fingerprint") == expected["base_fingerprint"]:
            continue
        for path in sorted(set(have) | set(want)):
            if path not in want:
                problems.append(f"{path}: {what} in the checkpoint, not in the tree")
            elif path not in have:
                problems.append(f"{path}: {what} in the tree, not in the checkpoint")
            elif have[path] != want[path]:
                if isinstance(want[path], dict):
                    for key in sorted(set(want[path]) | set(have[path])):
                        if have[path].get(key) != want[path].get(key):
                            problems.append(f"{path}: {key} saved {have[path].get(key)} vs "
                                            f"expected {want[path].get(key)}")
                else:
                    problems.append(f"{path}: {what} saved {have[path]} vs expected {want[path]}")
    return problems


def wrapped_like(meta: dict[str, Any], params: Any, where: str = "the checkpoint") -> Any:
    """The wrapped tree a checkpoint describes, built on the plain base ``params``: a LoRA
    node (abstract factors) for each saved kernel, a box for each ``train`` leaf.

    This is what lets ``lorax.restore(directory, base_params)`` restore without repeating the
    ``wrap`` settings. Named adapters (``lorax.add_adapter``) and PiSSA factors (which belong
    to a residual base, not to ``params``) need the wrapped tree itself.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2, alpha=4.0)
        >>> node = wrapped_like(describe(lp), {"kernel": jnp.ones((4, 4))})["kernel"]
        >>> node.rank, node.scale, node.a.shape
        (2, 2.0, (4, 2))
    """
    kernels, trained = meta["kernels"], meta["trained"]
    for key, entry in kernels.items():
        if key.endswith("]") or entry.get("residual"):
            kind = "named adapters" if key.endswith("]") else "PiSSA factors"
            raise ValueError(f"{where} holds {kind} at {key!r}: restore into the wrapped tree "
                             "(`like` from lorax.add_adapter / lorax.wrap(..., init='pissa')), "
                             "not into plain params")

    def build(keypath: Any, leaf: Any) -> Any:
        path = path_str(keypath)
        if path in trained:
            return FullyTrained(leaf)
        if path not in kernels:
            return leaf
        k = kernels[path]
        node = LoRA(w=leaf, a=None, b=None, scale=k["scale"], rank=k["rank"],
                    n_stack=k["n_stack"], n_in=k["n_in"], path=path, dropout=k["dropout"],
                    layout=k.get("layout"))
        where_to = _factor_shardings(node)
        spec = {name: jax.ShapeDtypeStruct(tuple(k[name][0]), k[name][1],
                                           sharding=where_to[name])
                for name in ("a", "b", "magnitude") if name in k}
        return dataclasses.replace(node, a=spec["a"], b=spec["b"],
                                   magnitude=spec.get("magnitude"))

    return jax.tree_util.tree_map_with_path(build, params)


def _factor_shardings(node: LoRA) -> dict[str, Any]:
    """Where restored factors go: the factor shardings of ``w``'s ``NamedSharding``, else
    ``w``'s device (the default device for a NumPy ``w``)."""
    sharding = getattr(node.w, "sharding", None)
    if isinstance(sharding, NamedSharding):  # a placeholder magnitude gets its spec made too
        specs = node_specs(dataclasses.replace(node, magnitude=0), sharding.spec)
        return {name: NamedSharding(sharding.mesh, getattr(specs, name))
                for name in ("a", "b", "magnitude")}
    if sharding is None:
        sharding = compat.single_device_sharding(jax.devices()[0])
    return dict.fromkeys(("a", "b", "magnitude"), sharding)


def _abstract(tree: Any) -> Any:
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.restore` returns."""

    tree: Any
    step: int
    opt_state: Any = None
    extra: Any = None
    data: Any = None


class CheckpointManager:
    """Adapter checkpoints for a training loop, over ``orbax.checkpoint.CheckpointManager``.

    One step holds the adapters (never W), their metadata, and optionally the optimizer state,
    any ``extra`` pytree, and ``data`` (a JSON-able dict such as a data-iterator position).
    Saves are asynchronous by default; old steps beyond ``max_to_keep`` are deleted.

    Args:
        directory: where step directories are written.
        max_to_keep: keep only the newest N steps (``None`` keeps all).
        async_save: write in a background thread (call :meth:`wait_until_finished` or
            :meth:`close` before exiting).
        save_interval_steps: save only every N steps (other ``save`` calls return False).

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
        >>> with lorax.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
        ...     _ = mgr.save(10, lp, data={"epoch": 1})
        ...     mgr.wait_until_finished()
        ...     restored = mgr.restore(lp)
        >>> restored.step, restored.data
        (10, {'epoch': 1})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
                 async_save: bool = True, save_interval_steps: int = 1):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            save_interval_steps=save_interval_steps, cleanup_tmp_directories=True,
        )
        # One handler per item name, so orbax can read any subset of a step's items (and
        # their metadata) without warning about the items it was not asked for.
        handlers = {name: ocp.JsonCheckpointHandler() if name in (_META, _DATA)
                    else ocp.StandardCheckpointHandler()
                    for name in (_ADAPTERS, _META, _OPT, _EXTRA, _DATA)}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def save(self, step: int, tree: Any, *, opt_state: Any = None, extra: Any = None,
             data: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Saves the adapters of ``tree`` (and the optional items) as ``step``.

        Returns:
            Whether a save was started (False when ``save_interval_steps`` skips this step).
        """
        tree, opt_state = modules.as_tree(tree), modules.graph_state(opt_state)
        _check_adapted(tree)
        meta = describe(tree)
        if opt_state is not None:  # its leaf layout, checked against `opt_state=` on restore
            meta[_OPT] = leaf_layout(opt_state)
        items = {_ADAPTERS: ocp.args.StandardSave(split(tree)[0]),
                 _META: ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items[_OPT] = ocp.args.StandardSave(opt_state)
        if extra is not None:
            items[_EXTRA] = ocp.args.StandardSave(extra)
        if data is not None:
            items[_DATA] = ocp.args.JsonSave(data)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, like: Any, step: int | None = None, *, opt_state: Any = None,
                extra: Any = None) -> Restored:
        """Restores ``step`` (default: the latest) into the wrapped tree ``like``.

        Args:
            like: the wrapped tree to fill (its frozen W are kept; its factors' shardings, if
                any, are where the saved factors are placed), or the plain base params: the
                saved metadata then says which kernels are adapted and how
                (:func:`wrapped_like`).
            step: which step; the latest when ``None``.
            opt_state: a like-tree to restore the optimizer state into, of the structure that
                was saved: ``tx.init(train)`` for a state made on the trainable half
                (``train, frozen = lorax.split(like)``), which is what the README does. Another
                structure (``tx.init(like)``: holes are ``MaskedNode`` there, ``None`` in the
                half's state) is refused with a :class:`CheckpointMismatchError` naming the
                first differing path and the fix.
            extra: a like-tree for the saved ``extra`` item.

        Raises:
            FileNotFoundError: no checkpoint in the directory (or not that step).
            CheckpointMismatchError: the checkpoint does not fit ``like`` (all mismatches), or
                the saved optimizer state does not fit ``opt_state``.
            ValueError: the checkpoint files are unreadable (corrupted or truncated).
        """
        if modules.is_module(like) or modules.graph_state(opt_state) is not opt_state:
            restored = self.restore(modules.as_tree(like), step,
                                    opt_state=modules.graph_state(opt_state), extra=extra)
            tree = modules.rebuild(like, restored.tree) if modules.is_module(like) else \
                restored.tree
            return restored._replace(tree=tree, opt_state=modules.with_graph_state(
                opt_state, restored.opt_state))
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no lorax checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no step {step} in {self.directory}; steps: {sorted(self._manager.all_steps())}"
            )
        where = os.path.join(self.directory, str(step))
        saved = self._read(step, {_META: ocp.args.JsonRestore()}, where)[_META]
        if saved.get("format") != FORMAT:
            raise ValueError(f"{where} is not a lorax checkpoint of format {FORMAT}")
        if not any(is_node(x) for x in jax.tree.leaves(like, is_leaf=is_node)):
            like = wrapped_like(saved, like, where)
        problems = _mismatches(saved, describe(like))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not fit the tree (saved vs expected):\n  "
                + "\n  ".join(problems)
            )
        if opt_state is not None and _OPT in saved:
            problem = layout_mismatch(saved[_OPT], opt_state, "opt_state")
            if problem:
                raise CheckpointMismatchError(f"checkpoint {where}: {problem}")
        trainable, frozen = split(like)
        items = {_ADAPTERS: ocp.args.StandardRestore(_abstract(trainable))}
        if opt_state is not None:
            items[_OPT] = ocp.args.StandardRestore(_abstract(opt_state))
        if extra is not None:
            items[_EXTRA] = ocp.args.StandardRestore(_abstract(extra))
        if os.path.isdir(os.path.join(where, _DATA)):  # (item metadata would read every item)
            items[_DATA] = ocp.args.JsonRestore()
        restored = self._read(step, items, where)
        return Restored(combine(restored[_ADAPTERS], frozen), step, restored.get(_OPT),
                        restored.get(_EXTRA), restored.get(_DATA))

    def _read(self, step: int, items: dict[str, Any], where: str) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except (FileNotFoundError, CheckpointMismatchError):
            raise
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise ValueError(
                f"could not read checkpoint {where} (corrupted or truncated?): "
                f"{type(err).__name__}: {err}"
            ) from err

    def latest_step(self) -> int | None:
        """The newest finished step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finished steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_adapted(tree: Any) -> None:
    """Refuses a tree with nothing to save: a step without adapters would hide the last good
    one."""
    check_tree(tree, "tree", is_node)
    check_whole(tree, "`tree`")
    if not any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node)):
        raise ValueError(
            "expected `tree` to hold adapters (LoRA nodes or FullyTrained leaves), got a tree "
            "without any: a merged or unwrapped tree has nothing to checkpoint; save the wrapped "
            "tree (before lorax.merge) or use orbax directly for plain params")


def _check_exists(directory: str | os.PathLike) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"expected `directory` to be an existing checkpoint directory, "
                                f"got {os.fspath(directory)!r}, which does not exist")


def save(directory: str | os.PathLike, tree: Any, *, step: int | None = None,
         extra: Any = None) -> int:
    """Writes the adapters of ``tree`` (never W) and their metadata; returns the step written.

    Args:
        directory: the checkpoint directory (created if needed).
        tree: a wrapped tree.
        step: the step number; default one past the latest in ``directory`` (0 when empty).
        extra: an optional pytree to save alongside (e.g. the optimizer state).

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
        >>> directory = tempfile.mkdtemp()
        >>> lorax.save(directory, lp)
        0
        >>> bool((lorax.restore(directory, lp)["kernel"].a == lp["kernel"].a).all())
        True
    """
    _check_adapted(modules.as_tree(tree))
    with CheckpointManager(directory, async_save=False) as manager:
        if step is None:
            latest = manager.latest_step()
            step = 0 if latest is None else latest + 1
        manager.save(step, tree, extra=extra, force=True)
    return step


def restore(directory: str | os.PathLike, like: Any, *, step: int | None = None,
            extra: Any = None) -> Any:
    """Returns ``like`` with its adapters replaced by the saved ones (latest step by default).

    ``like`` is the wrapped tree to fill, or the plain base params, which the saved metadata
    wraps as it was (:func:`wrapped_like`). With ``extra`` (a like-tree), returns
    ``(tree, extra)``. Raises :class:`CheckpointMismatchError` listing every path whose rank,
    axes, shape or dtype differs, or that exists on one side only.

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> directory = tempfile.mkdtemp()
        >>> _ = lorax.save(directory, lorax.wrap(params, rank=2))
        >>> lorax.restore(directory, lorax.wrap(params, rank=2))["kernel"].rank
        2
        >>> lorax.restore(directory, params)["kernel"].rank  # the settings come from disk
        2
        >>> lorax.restore(directory, lorax.wrap(params, rank=1))
        Traceback (most recent call last):
        ...
        lorax.checkpoint.CheckpointMismatchError: checkpoint ... does not fit the tree ...
    """
    _check_exists(directory)
    with CheckpointManager(directory, async_save=False) as manager:
        restored = manager.restore(like, step, extra=extra)
    return (restored.tree, restored.extra) if extra is not None else restored.tree

"""PiSSA initialisation (arXiv 2404.02948): factors from the kernel's principal singular triplets.

``lorax.wrap(..., init="pissa")`` factors each kernel ``W`` (flattened to ``(in, out)`` per
stack entry) as ``U S Vᵀ`` and starts the adapter on its top ``r`` triplets::

    a = U_r √S_r / √s        b = √S_r V_rᵀ / √s        (so s·a·b = U_r S_r V_rᵀ)
    w = W − s·a·b            (the residual: the frozen base no longer is W)

so the model is unchanged at step 0 while training moves the kernel's principal subspace.
``init="pissa_niter_<k>"`` uses a randomized SVD with ``k`` power iterations (Halko et al.,
as PEFT's ``pissa_niter_<k>``), much faster for large kernels.

Because ``w`` is a residual, the node is marked ``residual=True``: :func:`lorax.merge` of such a
tree is the complete fine-tuned model (``w + s·a·b``), but the factors alone are not a LoRA of the
original base. :func:`to_lora` turns them into one of rank ``2r`` (PEFT's conversion), which
:func:`lorax.peft.save` can then write; saving residual nodes directly is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from lorax.layouts import Layout
from lorax.node import LoRA, is_lora, is_node
from lorax.paths import paired_leaves

_NITER = re.compile(r"pissa_niter_(\d+)")
OVERSAMPLE = 8
"""Extra random directions sampled by the randomized SVD beyond the rank."""


def niter(init: str) -> int | None:
    """Power iterations of a PiSSA ``init`` string: ``None`` for the exact SVD (``"pissa"``).

    Raises:
        ValueError: for a string that is not ``"pissa"`` or ``"pissa_niter_<k>"``.

    Example:
        >>> niter("pissa"), niter("pissa_niter_4")
        (None, 4)
    """
    if init == "pissa":
        return None
    match = _NITER.fullmatch(init) if isinstance(init, str) else None
    if match is None:
        raise ValueError(f"expected `init` to be 'pissa' or 'pissa_niter_<k>', got {init!r}")
    return int(match[1])


def _top_svd(w2: jax.Array, rank: int, iters: int | None, key: jax.Array):
    """Top-``rank`` singular triplets of ``w2`` ``(*stack, I, O)``, exact or randomized."""
    if iters is None:
        u, s, vt = jnp.linalg.svd(w2, full_matrices=False)
        return u[..., :rank], s[..., :rank], vt[..., :rank, :]
    in_size, out_size = w2.shape[-2:]
    width = min(rank + OVERSAMPLE, in_size, out_size)
    omega = jax.random.normal(key, (*w2.shape[:-2], out_size, width), w2.dtype)
    q, _ = jnp.linalg.qr(w2 @ omega)
    for _ in range(iters):  # power iterations, re-orthonormalised each half step
        z, _ = jnp.linalg.qr(jnp.swapaxes(w2, -1, -2) @ q)
        q, _ = jnp.linalg.qr(w2 @ z)
    u_small, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w2, full_matrices=False)
    return (q @ u_small)[..., :rank], s[..., :rank], vt[..., :rank, :]


def init_factors(w: Any, rank: int, scale: float, layout: Layout, init: str, key: jax.Array,
                 dtype: Any) -> tuple[Any, Any, Any]:
    """PiSSA factors and residual base for one kernel ``w`` (canonical, as ``layout`` says):
    ``(a, b, residual)``.

    The residual is ``W − s·a·b`` with ``a``, ``b`` as stored (in ``dtype``), computed in
    float32 and cast to ``w``'s dtype, so ``residual + s·a·b`` reproduces ``W`` up to that cast.
    Abstract kernels (``jax.ShapeDtypeStruct``) give abstract results.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w, key = jnp.diag(jnp.array([3.0, 2.0, 1.0])), jax.random.key(0)
        >>> a, b, res = init_factors(w, 1, 1.0, Layout("io"), "pissa", key, jnp.float32)
        >>> top_moved = jnp.diag(jnp.array([0.0, 2.0, 1.0]))  # the top direction is in a @ b
        >>> bool(jnp.allclose(res, top_moved, rtol=0, atol=64 * jnp.finfo(w.dtype).eps * 3))
        True
    """
    shape = tuple(w.shape)
    stack, ins, outs = layout.groups(shape)
    a_shape, b_shape = (*stack, *ins, rank), (*stack, rank, *outs)
    if isinstance(w, jax.ShapeDtypeStruct):
        return (jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype),
                jax.ShapeDtypeStruct(shape, w.dtype))
    iters = niter(init)
    w2 = jnp.reshape(jnp.asarray(w, jnp.float32), (*stack, math.prod(ins), math.prod(outs)))
    u, s, vt = _top_svd(w2, rank, iters, key)
    root = jnp.sqrt(s / jnp.float32(scale))
    a2 = (u * root[..., None, :]).astype(dtype)
    b2 = (root[..., :, None] * vt).astype(dtype)
    low = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    residual = (w2 - jnp.float32(scale) * low).astype(w.dtype)
    return (jnp.reshape(a2, a_shape), jnp.reshape(b2, b_shape), jnp.reshape(residual, shape))


def to_lora(tree: Any, initial: Any) -> Any:
    """Converts PiSSA-initialised nodes into plain LoRA nodes over the original kernels.

    After training, ``w_res + s·a·b = W + s·(a·b − a₀·b₀)``, a LoRA of rank ``2r`` on the
    original ``W`` with factors ``[a, a₀]`` and ``[b; −b₀]`` (PEFT's
    ``path_initial_model_for_weight_conversion``). Each residual node of ``tree`` becomes such a
    node whose ``w`` is ``w_res + s·a₀·b₀`` (computed in float32, full size: an offline step);
    other leaves are kept. The scale is kept, so PEFT's ``lora_alpha`` doubles with the rank.

    Args:
        tree: the trained wrapped tree (``init="pissa"``).
        initial: the tree as :func:`lorax.wrap` returned it (the initial factors ``a₀``, ``b₀``).

    Returns:
        ``tree`` with every ``residual`` node replaced by a plain node of rank ``2r``.

    Raises:
        ValueError: when the two trees differ in structure, or a node's initial counterpart
            is missing or of another shape (naming its path).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.arange(12.0).reshape(4, 3)}
        >>> lp = lorax.wrap(params, rank=1, init="pissa")
        >>> plain = lorax.pissa.to_lora(lp, lp)["kernel"]
        >>> plain.rank, plain.residual, bool(jnp.allclose(plain.w, params["kernel"], atol=1e-4))
        (2, False, True)
    """
    pairs, treedef = paired_leaves(tree, initial, "initial", is_node)
    out = []
    for path, node, first in pairs:
        if not (is_lora(node) and node.residual):
            out.append(node)
            continue
        if not is_lora(first) or first.a.shape != node.a.shape or first.b.shape != node.b.shape:
            raise ValueError(
                f"expected `initial` to hold the initial PiSSA factors at {path!r}, got "
                f"{type(first).__name__}"
            )
        original = jnp.asarray(node.w, jnp.float32) + first.delta(jnp.float32)
        out.append(dataclasses.replace(
            node, w=original.astype(node.dtype),
            a=jnp.concatenate([node.a, first.a.astype(node.a.dtype)], axis=-1),
            b=jnp.concatenate([node.b, -first.b.astype(node.b.dtype)], axis=node.n_stack),
            rank=2 * node.rank, residual=False,
        ))
    return jax.tree_util.tree_unflatten(treedef, out)


def is_residual(x: Any) -> bool:
    """Whether ``x`` is a LoRA node over a PiSSA residual base.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.eye(4)}
        >>> is_residual(lorax.wrap(params, rank=2, init="pissa")["kernel"])
        True
        >>> is_residual(lorax.wrap(params, rank=2)["kernel"])
        False
    """
    return isinstance(x, LoRA) and x.residual

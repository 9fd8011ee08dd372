"""Small Gemma-style models for `tests/test_layouts.py` and `tests/test_conformance.py`.

Each model is described by a :class:`Model`: the plain function ``apply(params, x)``, its
parameters, its input and, per adapted kernel, a :class:`Kernel` that states facts about how
the model consumes it (the layout string, i.e. which axes are stack / input / output axes) and
hand-written einsums ``xa`` and ``xab`` (``x·a`` and ``(x·a)·b``) for the hand-written
factorized forward ``x·W + s·(x·a)·b``, with lorax's canonical factors ``a: (*stack, *in, r)``
and ``b: (*stack, r, *out)``.

The blocks are written once as functions of a ``proj(key, eqn, h, index=None)`` callback that
contracts ``h`` with the kernel called ``key``; the Linen and NNX modules give it their own
parameters and the hand-written factorized forward gives it ``x·W + s·(x·a)·b``. Nothing here
calls lorax.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Dims:
    B: int = 2  # batch
    T: int = 5  # sequence
    D: int = 32  # model width
    N: int = 4  # query heads
    H: int = 8  # head dim
    F: int = 64  # MLP hidden width (F > D, as in Gemma)
    L: int = 3  # scanned layers
    V: int = 16  # vocabulary (raw-dict model)


SMALL = Dims()
BIG = Dims(B=2, T=16, D=256, N=4, H=64, F=1024, L=2, V=512)


@dataclasses.dataclass(frozen=True)
class Kernel:
    layout: str  # one letter per kernel axis: s (stack), i (input), o (output)
    shape: tuple[int, ...]
    xa: str = ""  # einsum "x,a->xa" (on a[index] for indexed uses)
    xab: str = ""  # einsum "xa,b->y"
    # The layout lorax's zero-config defaults give when it differs from `layout` but serves the
    # use all the same (a 2-D kernel used transposed: "io" factors it as well as "oi").
    default: str | None = None


@dataclasses.dataclass
class Model:
    name: str
    apply: Callable[..., Any]  # apply(params, x) on plain params
    abstract: Any  # the params' tree of ShapeDtypeStruct
    x: Any  # an input (concrete)
    kernels: dict[str, Kernel]  # {'/'-joined path: Kernel}
    # hand(params, factors, scale, x): the same model with every kernel in `kernels` computed
    # as x·W + scale·(x·a)·b by hand; factors = {path: (a, b)}.
    hand: Callable[..., Any] | None = None

    def params(self, seed: int = 1) -> Any:
        """Random params from NumPy (no compiles): kernels N(0, 1/fan_in), fan_in the size of
        their input axes, vectors N(0, 0.1^2)."""
        rng = np.random.default_rng(seed)
        flat, treedef = jax.tree_util.tree_flatten_with_path(self.abstract)
        leaves = []
        for kp, s in flat:
            k = self.kernels.get(path_of(kp))
            if k is not None:
                fan_in = math.prod(n for n, c in zip(k.shape, k.layout, strict=True) if c == "i")
                leaves.append(jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), F32))
            else:
                leaves.append(jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)


def path_of(kp) -> str:
    """'/'-joined path of a key path (an NNX Variable's `.value` attribute dropped)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp
            if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
    return "/".join(keys)


def contract(eqn: str, h, w, index=None):
    """How a block consumes a kernel: an einsum, or (old-style gating) ``h @ w[index]``."""
    if index is None:
        return jnp.einsum(eqn, h, w)
    return jnp.dot(h, w[index])


# --- the kernels, per block kind --------------------------------------------------------------


def attention_kernels(kind: str, d: Dims) -> dict[str, Kernel]:
    """Gemma attention: MQA (one kv head), GQA (two kv heads for four query heads) or MHA
    (one fused q/k/v kernel)."""
    out = {}
    if kind == "mha":
        out["qkv_einsum"] = Kernel("soio", (3, d.N, d.D, d.H), "BTD,SDr->SBTr", "SBTr,SrNH->SBTNH")
    else:
        k = 1 if kind == "mqa" else 2
        out["q_einsum"] = Kernel("oio", (d.N, d.D, d.H), "BTD,Dr->BTr", "BTr,rNH->BTNH")
        out["kv_einsum"] = Kernel("soio", (2, k, d.D, d.H), "BSD,CDr->CBSr", "CBSr,CrKH->CBSKH")
    out["attn_vec_einsum"] = Kernel("iio", (d.N, d.H, d.D), "BTNH,NHr->BTr", "BTr,rD->BTD")
    return out


def mlp_kernels(style: str, d: Dims) -> dict[str, Kernel]:
    """Gemma's gated MLP: gating (2, F, D) used by one einsum (new style), or (2, D, F) used as
    ``x @ w[0]`` and ``x @ w[1]`` (old style); then linear (F, D)."""
    if style == "new":
        gating = Kernel("soi", (2, d.F, d.D), "...D,NDr->...Nr", "...Nr,NrF->...NF")
    else:  # xa / xab act on a[index] (D, r) and b[index] (r, F)
        gating = Kernel("sio", (2, d.D, d.F), "BTD,Dr->BTr", "BTr,rF->BTF")
    linear = Kernel("io", (d.F, d.D), "BTF,Fr->BTr", "BTr,rD->BTD")
    return {"gating_einsum": gating, "linear": linear}


# --- the blocks, written once over a `proj` callback ------------------------------------------


def attention(x, proj, kind: str, d: Dims):
    if kind == "mha":
        q, k, v = proj("qkv_einsum", "BTD,SNDH->SBTNH", x)
    else:
        q = proj("q_einsum", "BTD,NDH->BTNH", x)
        k, v = proj("kv_einsum", "BSD,CKDH->CBSKH", x)
    kv_heads = k.shape[-2]
    q = q.reshape(*q.shape[:2], kv_heads, d.N // kv_heads, d.H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) / jnp.asarray(math.sqrt(d.H), x.dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(*x.shape[:2], d.N, d.H)
    return proj("attn_vec_einsum", "BTNH,NHD->BTD", enc)


def mlp(x, proj, style: str):
    if style == "new":
        gate_up = proj("gating_einsum", "...D,NFD->...NF", x)
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    else:
        gate = proj("gating_einsum", "", x, index=0)
        up = proj("gating_einsum", "", x, index=1)
    return proj("linear", "BTF,FD->BTD", jax.nn.gelu(gate) * up)


def block(x, norm_scale, attn_proj, mlp_proj, kind: str, style: str, d: Dims):
    h = x * (1.0 + norm_scale[None, None])  # a 1-D parameter no kernel search may report
    x = x + attention(h, attn_proj, kind, d)
    return x + mlp(x, mlp_proj, style)


# --- Linen ------------------------------------------------------------------------------------


def _init(key, shape, dtype=F32):
    return jax.random.normal(key, shape, dtype) / math.sqrt(sorted(shape)[-2])


class Einsum(nn.Module):
    """A kernel ``w`` of a fixed shape under a Gemma-style module name (``q_einsum`` ...)."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn, h, index=None):
        return contract(eqn, h, self.param("w", _init, self.shape), index)


class LinenAttention(nn.Module):
    kind: str
    dims: Dims

    @nn.compact
    def __call__(self, x):
        shapes = {k: v.shape for k, v in attention_kernels(self.kind, self.dims).items()}

        def proj(key, eqn, h, index=None):
            return Einsum(shapes[key], name=key)(eqn, h, index)

        return attention(x, proj, self.kind, self.dims)


class LinenMLP(nn.Module):
    """Gemma's Linen layout: the kernels are leaves ``gating_einsum`` and ``linear`` directly
    under ``mlp``."""

    style: str
    dims: Dims

    @nn.compact
    def __call__(self, x):
        shapes = {k: v.shape for k, v in mlp_kernels(self.style, self.dims).items()}
        ws: dict[str, Any] = {}

        def proj(key, eqn, h, index=None):
            if key not in ws:
                ws[key] = self.param(key, _init, shapes[key])
            return contract(eqn, h, ws[key], index)

        return mlp(x, proj, self.style)


class LinenBlock(nn.Module):
    kind: str
    style: str
    dims: Dims

    @nn.compact
    def __call__(self, x):
        scale = self.param("norm_scale", nn.initializers.zeros, (self.dims.D,))
        x = x + LinenAttention(self.kind, self.dims, name="attn")(x * (1.0 + scale[None, None]))
        return x + LinenMLP(self.style, self.dims, name="mlp")(x)


# --- NNX --------------------------------------------------------------------------------------


class NnxEinsum(nnx.Module):
    def __init__(self, shape, rngs: nnx.Rngs):
        self.w = nnx.Param(_init(rngs.params(), shape))

    def __call__(self, eqn, h, index=None):
        return contract(eqn, h, self.w[...], index)


class NnxBlock(nnx.Module):
    """The same block in NNX: every kernel is ``w`` of a module, so the MLP's paths are
    ``mlp/gating_einsum/w`` and ``mlp/linear/w``."""

    def __init__(self, kind: str, style: str, dims: Dims, rngs: nnx.Rngs):
        self.kind, self.style, self.dims = kind, style, dims
        self.norm_scale = nnx.Param(jnp.zeros((dims.D,), F32))
        self.attn = nnx.Dict({k: NnxEinsum(v.shape, rngs)
                              for k, v in attention_kernels(kind, dims).items()})
        self.mlp = nnx.Dict({k: NnxEinsum(v.shape, rngs)
                             for k, v in mlp_kernels(style, dims).items()})

    def __call__(self, x):
        def attn_proj(key, eqn, h, index=None):
            return self.attn[key](eqn, h, index)

        def mlp_proj(key, eqn, h, index=None):
            return self.mlp[key](eqn, h, index)

        return block(x, self.norm_scale[...], attn_proj, mlp_proj, self.kind, self.style,
                     self.dims)


# --- the hand-written factorized forward of a block -------------------------------------------


def _hand_proj(get_w, get_ab, kernels: dict[str, Kernel], scale: float):
    def proj(key, eqn, h, index=None):
        w, (a, b), k = get_w(key), get_ab(key), kernels[key]
        if index is not None:
            a, b = a[index], b[index]
        xa = jnp.einsum(k.xa, h, a)
        return contract(eqn, h, w, index) + scale * jnp.einsum(k.xab, xa, b)

    return proj


def _block_hand(kind, style, d):
    ak, mk = attention_kernels(kind, d), mlp_kernels(style, d)

    def hand(params, factors, scale, x):
        def tree_get(path):
            node = params
            for part in path.split("/"):
                node = node[part]
            return node

        def attn_path(key):
            return f"attn/{key}/w"

        def mlp_path(key):
            return f"mlp/{key}"

        attn_proj = _hand_proj(lambda k: tree_get(attn_path(k)), lambda k: factors[attn_path(k)],
                               ak, scale)
        mlp_proj = _hand_proj(lambda k: tree_get(mlp_path(k)), lambda k: factors[mlp_path(k)],
                              mk, scale)
        return block(x, tree_get("norm_scale"), attn_proj, mlp_proj, kind, style, d)

    return hand


# --- the models -------------------------------------------------------------------------------

# (attention kind, MLP style) per Gemma-style block.
BLOCKS = {"mqa": ("mqa", "new"), "gqa": ("gqa", "old"), "mha": ("mha", "new")}


def _x(d: Dims, seed: int = 2):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((d.B, d.T, d.D)), F32)


def linen_block(name: str, d: Dims = SMALL) -> Model:
    kind, style = BLOCKS[name]
    module = LinenBlock(kind, style, d)
    x = _x(d)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    kernels = {f"attn/{k}/w": v for k, v in attention_kernels(kind, d).items()}
    kernels |= {f"mlp/{k}": v for k, v in mlp_kernels(style, d).items()}

    def apply(p, x):
        return module.apply({"params": p}, x)

    return Model(f"linen_{name}", apply, abstract, x, kernels,
                 _block_hand(kind, style, d))


def nnx_block(name: str, d: Dims = SMALL) -> Model:
    kind, style = BLOCKS[name]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxBlock(kind, style, d,
                                                                   nnx.Rngs(0))))
    kernels = {f"attn/{k}/w": v for k, v in attention_kernels(kind, d).items()}
    kernels |= {f"mlp/{k}/w": v for k, v in mlp_kernels(style, d).items()}

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return Model(f"nnx_{name}", apply, abstract, _x(d), kernels)


# Scanned stack: nn.scan over L layers of a block with a Dense and two einsum kernels.


class ScanBody(nn.Module):
    dims: Dims

    @nn.compact
    def __call__(self, x, _):
        d = self.dims
        h = jnp.tanh(nn.Dense(d.D, use_bias=False, name="mlp")(x))
        q = Einsum((d.N, d.D, d.H), name="q_einsum")("BTD,NDH->BTNH", h)
        return x + Einsum((d.N, d.H, d.D), name="attn_vec_einsum")("BTNH,NHD->BTD",
                                                                     jnp.tanh(q)), None


class ScanStack(nn.Module):
    dims: Dims
    stack_name: str = "layers"

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.dims.L)
        return stack(self.dims, name=self.stack_name)(x, None)[0]


def scan_kernels(d: Dims, stack: str = "layers") -> dict[str, Kernel]:
    return {
        f"{stack}/mlp/kernel": Kernel("sio", (d.L, d.D, d.D), "BTD,Dr->BTr", "BTr,rE->BTE"),
        f"{stack}/q_einsum/w": Kernel("soio", (d.L, d.N, d.D, d.H), "BTD,Dr->BTr", "BTr,rNH->BTNH"),
        f"{stack}/attn_vec_einsum/w": Kernel("siio", (d.L, d.N, d.H, d.D), "BTNH,NHr->BTr",
                                             "BTr,rD->BTD"),
    }


def scan_model(d: Dims = SMALL, stack: str = "layers") -> Model:
    """A scanned stack named ``stack``: ``layers`` (Flax's convention, which lorax's defaults
    read as a stack) or another name (which needs ``stacked=``/``axes=``)."""
    module = ScanStack(d, stack)
    x = _x(d)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    kernels = scan_kernels(d, stack)

    def apply(p, x):
        return module.apply({"params": p}, x)

    def hand(params, factors, scale, x):
        layers = params[stack]
        xs = (layers["mlp"]["kernel"], layers["q_einsum"]["w"], layers["attn_vec_einsum"]["w"],
              *(factors[p] for p in kernels))
        ks = list(kernels.values())

        def lin(k, eqn, h, w, ab):
            return jnp.einsum(eqn, h, w) + scale * jnp.einsum(k.xab, jnp.einsum(k.xa, h, ab[0]),
                                                              ab[1])

        def body(x, layer):
            w_mlp, w_q, w_o, ab_mlp, ab_q, ab_o = layer
            h = jnp.tanh(lin(ks[0], "BTD,DE->BTE", x, w_mlp, ab_mlp))
            q = lin(ks[1], "BTD,NDH->BTNH", h, w_q, ab_q)
            return x + lin(ks[2], "BTNH,NHD->BTD", jnp.tanh(q), w_o, ab_o), None

        return lax.scan(body, x, xs)[0]

    return Model("linen_scan" if stack == "layers" else f"linen_scan_{stack}", apply, abstract,
                 x, kernels, hand)


# Locally connected convolution: kernel (out_h, out_w, kh*kw*C, features).

CONV_LOCAL_DN = ("NHWC", "HWIO", "NHWC")


class ConvLocalNet(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.ConvLocal(self.features, (3, 3), padding="VALID", use_bias=False)(x)


def conv_local_model(d: Dims = SMALL) -> Model:
    c, f, size = 4, 8, 7  # in channels, features, spatial size
    if d.D >= 256:
        c, f, size = 32, 64, 12
    module = ConvLocalNet(f)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((d.B, size, size, c)), F32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    o = size - 2
    kernels = {"ConvLocal_0/kernel": Kernel("ssio", (o, o, 9 * c, f), "BHWP,HWPr->BHWr",
                                            "BHWr,HWrF->BHWF")}

    def apply(p, x):
        return module.apply({"params": p}, x)

    def hand(params, factors, scale, x):
        k = kernels["ConvLocal_0/kernel"]
        a, b = factors["ConvLocal_0/kernel"]
        patches = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "VALID",
                                                   dimension_numbers=CONV_LOCAL_DN)
        y = jnp.einsum("BHWP,HWPF->BHWF", patches, params["ConvLocal_0"]["kernel"])
        return y + scale * jnp.einsum(k.xab, jnp.einsum(k.xa, patches, a), b)

    return Model("linen_conv_local", apply, abstract, x, kernels, hand)


# A raw dict of arrays with a plain function: a table lookup, einsums and dots, one kernel
# stored transposed, and the table tied as the output projection (Gemma's decode).


def raw_kernels(d: Dims) -> dict[str, Kernel]:
    return {
        "embed/table": Kernel("io", (d.V, d.D)),
        "wq": Kernel("ioo", (d.D, d.N, d.H), "btd,dr->btr", "btr,rnh->btnh"),
        "wo": Kernel("iio", (d.N, d.H, d.D), "btnh,nhr->btr", "btr,rd->btd"),
        "up": Kernel("io", (d.D, d.F), "btd,dr->btr", "btr,rf->btf"),
        "down_t": Kernel("oi", (d.D, d.F), "btf,fr->btr", "btr,rd->btd",
                         default="io"),
    }


def raw_forward(p, ids):
    table = p["embed"]["table"]
    x = table[ids]
    q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    x = x + jnp.einsum("btnh,nhd->btd", jnp.tanh(q), p["wo"])
    h = jnp.tanh(jnp.dot(x, p["up"]))
    x = x + jnp.dot(h, p["down_t"].T)
    return jnp.einsum("btd,vd->btv", x, table)  # logits through the tied table


def raw_model(d: Dims = SMALL) -> Model:
    kernels = raw_kernels(d)
    abstract = {"embed": {"table": jax.ShapeDtypeStruct((d.V, d.D), F32)},
                **{p: jax.ShapeDtypeStruct(k.shape, F32) for p, k in kernels.items()
                   if p != "embed/table"}}
    ids = jnp.asarray(np.random.default_rng(4).integers(0, d.V, (d.B, d.T)), jnp.int32)

    def hand(params, factors, scale, ids):
        def lin(path, eqn, h, w):
            k = kernels[path]
            a, b = factors[path]
            return jnp.einsum(eqn, h, w) + scale * jnp.einsum(k.xab, jnp.einsum(k.xa, h, a), b)

        table = params["embed"]["table"]
        a, b = factors["embed/table"]  # a (V, r), b (r, D)
        x = table[ids] + scale * jnp.einsum("btr,rd->btd", a[ids], b)
        q = lin("wq", "btd,dnh->btnh", x, params["wq"])
        x = x + lin("wo", "btnh,nhd->btd", jnp.tanh(q), params["wo"])
        h = jnp.tanh(lin("up", "btd,df->btf", x, params["up"]))
        x = x + lin("down_t", "btf,df->btd", h, params["down_t"])
        xb = jnp.einsum("btd,rd->btr", x, b)  # x·(a b)^T = (x·b^T)·a^T
        return jnp.einsum("btd,vd->btv", x, table) + scale * jnp.einsum("btr,vr->btv", xb, a)

    return Model("raw_dict", raw_forward, abstract, ids, kernels, hand)


BUILDERS: dict[str, Callable[[Dims], Model]] = {
    **{f"linen_{n}": (lambda d, n=n: linen_block(n, d)) for n in BLOCKS},
    **{f"nnx_{n}": (lambda d, n=n: nnx_block(n, d)) for n in BLOCKS},
    "linen_scan": scan_model,
    "linen_scan_blocks": lambda d: scan_model(d, "blocks"),
    "linen_conv_local": conv_local_model,
    "raw_dict": raw_model,
}

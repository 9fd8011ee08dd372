"""Small models in the shapes of third-party model code, for the zero-config tests
(`tests/test_zero_config.py`). Written for these tests from the upstream shapes, not copied:

* ``maxtext``: MaxText's Linen decoder: ``nn.scan`` with ``variable_axes={"params": 1}`` (its
  ``param_scan_axis`` default) and ``metadata_params={nn.PARTITION_NAME: "layers"}`` over a
  block of RMS norms, q/k/v ``(embed, heads, head_dim)``, out ``(heads, head_dim, embed)`` and a
  gated MLP ``wi_0``/``wi_1`` ``(embed, mlp)``, ``wo`` ``(mlp, embed)``, every parameter boxed
  with ``nn.with_logical_partitioning``; a ``logits_dense`` head. Kernels come out as
  ``decoder/layers/mlp/wi_0/kernel`` ``(embed, layers, mlp)``; used boxed or ``nn.unbox``-ed.
* ``maxtext_moe``: MaxText's routed MoE layers (``RoutedMoE``'s sparse-matmul path, scanned
  the same way): a ``gate`` kernel, top-2 routing, ``lax.ragged_dot`` over the expert stacks
  ``wi_0``/``wi_1`` ``(exp, embed_no_exp, mlp)`` and ``wo``; boxed.
* ``vit``: big_vision's ViT with ``scan=True``: ``nn.scan(nn.remat(block), variable_axes=
  {"params": 0}, ...)(name="encoderblock")`` over LayerNorm, Flax's
  ``MultiHeadDotProductAttention`` and an ``MlpBlock`` of two Dense; a patch ``Conv``, a
  position embedding and a ``head``.
* ``nnx_gemma``: Flax's ``examples/gemma`` (NNX): ``nnx.Einsum`` attention with Gemma's einsum
  strings (parameter ``kernel``), ``gate_proj``/``up_proj``/``down_proj`` ``nnx.Linear``, RMS
  norms, a list of layers (``layers/0/...``) and the embedding's ``attend`` as the head.
* ``nnx_stacked``: NNX layers made with ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
  "layers"})`` and run by ``nnx.scan``, kernels from ``nnx.with_partitioning``, under an
  attribute named ``trunk``: only the variables' sharding names say which axis is the stack.

Each builder returns ``(fn, params, x, layouts)``: ``fn(params, x)``, concrete float32 params
(boxed where the model boxes them), an input, and ``{path: layout}`` for every kernel the
zero-config ``wrap`` adapts, written down from the model's einsums.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

B, T, D, N, H, F, V = 2, 4, 32, 4, 8, 64, 48
SMALL = {"B": 2, "T": 4, "D": 32, "N": 4, "H": 8, "F": 64, "V": 48}
BIG = {"B": 2, "T": 16, "D": 256, "N": 4, "H": 64, "F": 1024, "V": 512}
_ABSTRACT = False


@contextlib.contextmanager
def big_and_abstract():
    """Within: the models at :data:`BIG` dims (the modules read these globals when they build
    and when they run), their params abstract (``jax.ShapeDtypeStruct``)."""
    global _ABSTRACT
    names = globals()
    try:
        names.update(BIG)
        _ABSTRACT = True
        yield
    finally:
        names.update(SMALL)
        _ABSTRACT = False


def _linen_params(model, *inputs):
    init = functools.partial(model.init, jax.random.key(0))
    return (jax.eval_shape(init, *inputs) if _ABSTRACT else jax.jit(init)(*inputs))["params"]


def _nnx_split(make):
    return nnx.split(nnx.eval_shape(make) if _ABSTRACT else make())


def _x(seed: int = 0, shape=None):
    shape = (B, T, D) if shape is None else shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(names):
    return nn.with_logical_partitioning(nn.initializers.normal(0.3), names)


# --- MaxText-style Linen decoder --------------------------------------------------------------


class _Proj(nn.Module):
    """A kernel of ``shape`` boxed with logical ``names``, contracted by ``eqn``."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    eqn: str

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("kernel", _init(self.names), self.shape))


class _RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("norm",)), (x.shape[-1],))
        norm = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        return x * norm * scale[None, None]


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, h):
        gate = _Proj((D, F), ("embed", "mlp"), "btd,df->btf", name="wi_0")(h)
        up = _Proj((D, F), ("embed", "mlp"), "btd,df->btf", name="wi_1")(h)
        return _Proj((F, D), ("mlp", "embed"), "btf,fd->btd", name="wo")(jax.nn.gelu(gate) * up)


class _SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, h):
        q, k, v = (_Proj((D, N, H), ("embed", "q_heads", "kv"), "btd,dnh->btnh", name=n)(h)
                   for n in ("query", "key", "value"))
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        mixed = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits), v)
        return _Proj((N, H, D), ("heads", "kv", "embed"), "btnh,nhd->btd", name="out")(mixed)


class _MaxTextLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + _SelfAttention(name="self_attention")(
            _RMSNorm(name="pre_self_attention_layer_norm")(x))
        return x + _Mlp(name="mlp")(_RMSNorm(name="post_self_attention_layer_norm")(x)), None


class _MaxTextDecoder(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_MaxTextLayer, variable_axes={"params": 1},
                        split_rngs={"params": True}, length=self.layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x = stack(name="layers")(x, None)[0]
        x = _RMSNorm(name="decoder_norm")(x)
        return _Proj((D, V), ("embed", "vocab"), "btd,dv->btv", name="logits_dense")(x)


class _MaxTextTransformer(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, ids):
        table = nn.Embed(V, D, embedding_init=_init(("vocab", "embed")), name="token_embedder")
        return _MaxTextDecoder(self.layers, name="decoder")(table(ids))


def maxtext(boxed: bool, layers: int = 3):
    """The MaxText-style decoder, its params boxed (``nn.LogicallyPartitioned``) or unboxed."""
    model = _MaxTextTransformer(layers)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    params = _linen_params(model, ids)
    if not boxed:
        params = nn.unbox(params)

    def fn(p, ids):
        return model.apply({"params": p}, ids)

    pre = "decoder/layers"
    layouts = {f"{pre}/self_attention/{n}/kernel": "isoo" for n in ("query", "key", "value")}
    layouts[f"{pre}/self_attention/out/kernel"] = "isio"
    layouts.update({f"{pre}/mlp/{n}/kernel": "iso" for n in ("wi_0", "wi_1", "wo")})
    return fn, params, ids, layouts


class _MoeBlock(nn.Module):
    """MaxText's routed MoE (``RoutedMoE``, sparse-matmul path): a ``gate`` kernel, top-2
    routing, tokens sorted by expert, ``lax.ragged_dot`` with the expert stacks ``wi_0``/``wi_1``
    ``(exp, embed_no_exp, mlp)`` and ``wo`` ``(exp, mlp, embed_no_exp)``, unsorted and mixed."""

    experts: int = 4

    @nn.compact
    def __call__(self, x):
        e, k = self.experts, 2
        tokens = x.reshape(-1, D)
        logits = _Proj((D, e), ("embed", None), "td,de->te", name="gate")(tokens)
        weights, chosen = jax.lax.top_k(logits, k)
        flat = chosen.reshape(-1)
        order = jnp.argsort(flat)
        rows = jnp.repeat(tokens, k, axis=0)[order]
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        wi = [self.param(n, _init(("exp", "embed_no_exp", "mlp")), (e, D, F))
              for n in ("wi_0", "wi_1")]
        wo = self.param("wo", _init(("exp", "mlp", "embed_no_exp")), (e, F, D))
        gate, up = (jax.lax.ragged_dot(rows, w, sizes) for w in wi)
        out = jax.lax.ragged_dot(jax.nn.gelu(gate) * up, wo, sizes)[jnp.argsort(order)]
        mixed = jnp.einsum("tkd,tk->td", out.reshape(-1, k, D), jax.nn.softmax(weights))
        return mixed.reshape(x.shape)


class _MoeLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + _MoeBlock(name="MoeBlock_0")(_RMSNorm(name="post_self_attention_layer_norm")(
            x)), None


class _MoeDecoder(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_MoeLayer, variable_axes={"params": 1}, split_rngs={"params": True},
                        length=self.layers, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(name="layers")(x, None)[0]


def maxtext_moe(layers: int = 2):
    """MaxText-style scanned MoE layers (boxed): the expert stacks come out as
    ``(exp, layers, embed_no_exp, mlp)``, two stack axes."""
    model = _MoeDecoder(layers, name="decoder")
    x = _x(4)
    params = _linen_params(model, x)

    def fn(p, x):
        return model.apply({"params": p}, x)

    pre = "layers/MoeBlock_0"
    return fn, params, x, {f"{pre}/gate/kernel": "iso", f"{pre}/wi_0": "ssio",
                           f"{pre}/wi_1": "ssio", f"{pre}/wo": "ssio"}


# --- big_vision-style ViT, scan=True ---------------------------------------------------------


class MlpBlock(nn.Module):  # named as upstream: its name is in the params' paths
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D)(jax.nn.gelu(nn.Dense(F)(x)))


class _Encoder1DBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=N, deterministic=True)(y, y)
        return x + MlpBlock()(nn.LayerNorm()(x)), None


class _ViTEncoder(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_Encoder1DBlock, prevent_cse=False)
        x = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=self.depth)(name="encoderblock")(x, None)[0]
        return nn.LayerNorm(name="encoder_norm")(x)


class _ViT(nn.Module):
    depth: int
    classes: int = 10

    @nn.compact
    def __call__(self, image):
        x = nn.Conv(D, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(image)
        x = x.reshape(x.shape[0], -1, D)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], D))
        x = _ViTEncoder(self.depth, name="Transformer")(x + pos)
        return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=1))


def vit(depth: int):
    """The ViT with ``depth`` scanned blocks under ``Transformer/encoderblock``."""
    model = _ViT(depth)
    image = _x(2, (B, 8, 8, 3))
    params = _linen_params(model, image)

    def fn(p, image):
        return model.apply({"params": p}, image)

    pre = "Transformer/encoderblock"
    attn = f"{pre}/MultiHeadDotProductAttention_0"
    layouts = {f"{attn}/{n}/kernel": "sioo" for n in ("query", "key", "value")}
    layouts[f"{attn}/out/kernel"] = "siio"
    layouts.update({f"{pre}/MlpBlock_0/Dense_0/kernel": "sio",
                    f"{pre}/MlpBlock_0/Dense_1/kernel": "sio",
                    "embedding/kernel": "iiio", "head/kernel": "io"})
    return fn, params, image, layouts


# --- Flax's examples/gemma (NNX): nnx.Einsum ---------------------------------------------------


def _no_eager_sharding():
    use = getattr(nnx, "use_eager_sharding", None)  # flax >= 0.12.x shards annotated variables
    return use(False) if use is not None else contextlib.nullcontext()


class _RMSNormNNX(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.zeros((dim,)))

    def __call__(self, x):
        norm = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        return x * norm * (1 + self.scale[None, None])


class _GemmaAttention(nnx.Module):
    def __init__(self, kind: str, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        if kind == "mha":
            self.qkv_einsum = nnx.Einsum("BTD,SNDH->SBTNH", (3, N, D, H), kernel_init=init,
                                         rngs=rngs)
        else:
            self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (N, D, H), kernel_init=init, rngs=rngs)
            self.kv_einsum = nnx.Einsum("BTD,CKDH->CBTKH", (2, 1, D, H), kernel_init=init,
                                        rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), kernel_init=init,
                                          rngs=rngs)
        self.kind = kind

    def __call__(self, x):
        if self.kind == "mha":
            q, k, v = self.qkv_einsum(x)
        else:
            q = self.q_einsum(x)
            k, v = self.kv_einsum(x)  # one kv head (MQA), repeated over the query heads
            k, v = (jnp.repeat(t, N, axis=2) for t in (k, v))
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H)
        encoded = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits), v)
        return self.attn_vec_einsum(encoded)


class _FeedForward(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        self.gate_proj = nnx.Linear(D, F, use_bias=False, kernel_init=init, rngs=rngs)
        self.up_proj = nnx.Linear(D, F, use_bias=False, kernel_init=init, rngs=rngs)
        self.down_proj = nnx.Linear(F, D, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.gate_proj(x)) * self.up_proj(x))


class _GemmaBlock(nnx.Module):
    def __init__(self, kind: str, rngs: nnx.Rngs):
        self.pre_attention_norm = _RMSNormNNX(D)
        self.attn = _GemmaAttention(kind, rngs)
        self.pre_ffw_norm = _RMSNormNNX(D)
        self.mlp = _FeedForward(rngs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class _GemmaNNX(nnx.Module):
    def __init__(self, kind: str, layers: int, rngs: nnx.Rngs):
        self.embedder = nnx.Embed(V, D, rngs=rngs)
        self.layers = getattr(nnx, "List", list)(
            [_GemmaBlock(kind, rngs) for _ in range(layers)])
        self.final_norm = _RMSNormNNX(D)

    def __call__(self, ids):
        x = self.embedder(ids)
        for layer in self.layers:
            x = layer(x)
        return self.embedder.attend(self.final_norm(x))


def nnx_gemma(kind: str, layers: int = 2):
    """Flax's NNX Gemma: ``kind`` "mqa" (``q_einsum`` + ``kv_einsum``) or "mha"
    (``qkv_einsum``)."""
    graphdef, state = _nnx_split(lambda: _GemmaNNX(kind, layers, nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)

    def fn(s, ids):
        return nnx.merge(graphdef, s)(ids)

    layouts = {}
    for i in range(layers):
        pre = f"layers/{i}"
        if kind == "mha":
            layouts[f"{pre}/attn/qkv_einsum/kernel"] = "soio"
        else:
            layouts[f"{pre}/attn/q_einsum/kernel"] = "oio"
            layouts[f"{pre}/attn/kv_einsum/kernel"] = "soio"
        layouts[f"{pre}/attn/attn_vec_einsum/kernel"] = "iio"
        layouts.update({f"{pre}/mlp/{n}/kernel": "io"
                        for n in ("gate_proj", "up_proj", "down_proj")})
    return fn, state, ids, layouts


# --- NNX layers stacked by nnx.vmap, named only by their sharding metadata --------------------


class _Trunk(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class _Stacked(nnx.Module):
    def __init__(self, layers: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return _Trunk(rngs)

        self.trunk = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(block, x):
            return block(x)

        return body(self.trunk, x)


def nnx_stacked(layers: int = 3):
    """Layers under ``trunk`` stacked by ``nnx.vmap``; sharding names ``('layers', ...)``."""
    with _no_eager_sharding():
        graphdef, state = _nnx_split(lambda: _Stacked(layers, nnx.Rngs(0)))
    x = _x(3)

    def fn(s, x):
        with _no_eager_sharding():
            return nnx.merge(graphdef, s)(x)

    return fn, state, x, {"trunk/up/kernel": "sio", "trunk/down/kernel": "sio"}


BUILDERS = {
    "maxtext_boxed": lambda: maxtext(boxed=True),
    "maxtext_unboxed": lambda: maxtext(boxed=False),
    "maxtext_moe": maxtext_moe,
    "vit_depth2": lambda: vit(2),  # depth below the rank
    "vit_depth6": lambda: vit(6),  # depth above the rank
    "nnx_gemma_mqa": lambda: nnx_gemma("mqa"),
    "nnx_gemma_mha": lambda: nnx_gemma("mha"),
    "nnx_stacked": nnx_stacked,
}

"""A Llama-architecture decoder in Flax Linen (SmolLM2's shapes), with a KV cache for decoding.

Pre-norm transformer: token embedding, ``n_layers`` blocks of grouped-query attention with
rotary position embeddings (Hugging Face's rotate-half convention) and a SwiGLU feed-forward
network, RMSNorm before each and at the end, and an output head tied to the embedding
(``logits = h · Eᵀ``). The blocks are one ``nn.scan`` named ``layers``, so each kernel carries
a leading layer axis (``lorax.wrap`` reads it as a stack axis: one adapter per layer) and a
30-layer model compiles one block.

Parameter tree (``/``-separated; ``L`` layers, ``d`` width, ``H``/``K`` query/key-value heads of
``h`` dims, ``F`` FFN width)::

    embed_tokens/embedding                          (vocab, d)
    layers/input_layernorm/scale                    (L, d)
    layers/self_attn/{q_proj,o_proj}/kernel         (L, d, H·h), (L, H·h, d)
    layers/self_attn/{k_proj,v_proj}/kernel         (L, d, K·h)
    layers/post_attention_layernorm/scale           (L, d)
    layers/mlp/{gate_proj,up_proj}/kernel           (L, d, F)
    layers/mlp/down_proj/kernel                     (L, F, d)
    norm/scale                                      (d,)

Kernels are ``(in, out)``: the transpose of PyTorch's ``Linear.weight``.

One call serves training, prefill and decoding. Without a cache it is the causal forward of a
right-padded batch (``positions`` default to ``0..T-1``). With a cache (:func:`init_cache`), the
``T`` new tokens are written at slot ``index`` of every layer's keys and values and attend to
the slots ``<=`` their own whose ``valid`` flag is set (:func:`generate` left-pads prompts and
marks the padding invalid).

Example:
    >>> config = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
    ...                      d_ff=24)
    >>> model = Llama(config)
    >>> tokens = jnp.zeros((2, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)["params"]
    >>> logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    >>> logits.shape, params["layers"]["self_attn"]["k_proj"]["kernel"].shape
    ((2, 5, 32), (2, 16, 8))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (defaults: SmolLM2-135M).

    Attributes:
        vocab_size: Rows of the (tied) embedding.
        d_model: Model width.
        n_layers: Number of decoder blocks.
        n_heads: Query heads; must divide ``d_model``.
        n_kv_heads: Key/value heads (grouped-query attention); must divide ``n_heads``.
        d_ff: SwiGLU hidden width.
        rope_theta: Rotary embedding base.
        rms_eps: RMSNorm epsilon.

    Example:
        >>> LlamaConfig().head_dim, LlamaConfig().n_kv_heads
        (64, 3)
    """

    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    d_ff: int = 1536
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"expected `{name}` to be a positive int, got {value!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"expected `n_heads` ({self.n_heads}) to divide `d_model` ({self.d_model}) and "
                f"`n_kv_heads` ({self.n_kv_heads}) to divide `n_heads`"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads


class Cache(NamedTuple):
    """Every layer's keys and values, ``(L, B, S, K, h)``, and which slots hold a token."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array  # (B, S) bool: slots holding a real token (not left padding, not unused)


def init_cache(config: LlamaConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache of ``slots`` positions (prompt plus generated tokens) for ``batch`` rows.

    Example:
        >>> init_cache(LlamaConfig(n_layers=2), 3, 8).k.shape
        (2, 3, 8, 3, 64)
    """
    shape = (config.n_layers, batch, slots, config.n_kv_heads, config.head_dim)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch, slots), jnp.bool_))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention, of ``x: (B, T, heads, h)`` at ``positions:
    (B, T)``."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq[None, None]  # (B, T, half)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) · scale``, computed in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings; reads and writes one layer's cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv, index):
        c = self.config
        b, t, _ = x.shape
        h, k_heads, group = c.head_dim, c.n_kv_heads, c.n_heads // c.n_kv_heads
        q = _dense(c.n_heads * h, "q_proj")(x).reshape(b, t, c.n_heads, h)
        k = _dense(k_heads * h, "k_proj")(x).reshape(b, t, k_heads, h)
        v = _dense(k_heads * h, "v_proj")(x).reshape(b, t, k_heads, h)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache_kv is not None:
            ck, cv = cache_kv
            start = (0, index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            k, v, cache_kv = ck.astype(x.dtype), cv.astype(x.dtype), (ck, cv)
        q = q.reshape(b, t, k_heads, group, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k) / jnp.sqrt(h).astype(x.dtype)
        scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -1e30)
        weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", weights, v).reshape(b, t, c.n_heads * h)
        return _dense(c.d_model, "o_proj")(out), cache_kv


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c.d_ff, "gate_proj")(x)
        return _dense(c.d_model, "down_proj")(nn.silu(gate) * _dense(c.d_ff, "up_proj")(x))


class DecoderLayer(nn.Module):
    """One pre-norm block (the body of the scan over layers)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cache_kv, positions, mask, index):
        c = self.config
        h, cache_kv = Attention(c, name="self_attn")(
            RMSNorm(c.rms_eps, name="input_layernorm")(x), positions, mask, cache_kv, index)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_eps, name="post_attention_layernorm")(x))
        return x, cache_kv


class Llama(nn.Module):
    """The decoder: ``(tokens, ...) -> (logits, cache)`` (see the module docstring)."""

    config: LlamaConfig
    unroll: int | bool = 1  # of the scan over layers (True: straight-line code, all layers)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        index: jax.Array | int = 0,
        valid: jax.Array | None = None,
        embedded: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Logits of every position, and the cache with the new tokens written.

        Args:
            tokens: ``(B, T)`` token ids.
            positions: ``(B, T)`` rotary positions; default ``index + 0..T-1``.
            cache: from :func:`init_cache` (or a previous call); ``None`` for a plain forward.
            index: the cache slot of the first new token.
            valid: ``(B, T)``: which new tokens are real (left padding is not); default all.
            embedded: ``(B, T, d)`` activations to use instead of the embedding lookup of
                ``tokens`` (a benchmark differentiates with respect to them).
        """
        c = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        if valid is None:
            valid = jnp.ones((b, t), jnp.bool_)
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed_tokens")
        x = embed(tokens) if embedded is None else embedded
        if cache is None:
            keys_valid, slots, kv = valid, t, None
        else:
            keys_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
            slots, kv = cache.valid.shape[1], (cache.k, cache.v)
        query_slot = index + jnp.arange(t)
        causal = jnp.arange(slots)[None, :] <= query_slot[:, None]  # (T, S)
        mask = causal[None] & keys_valid[:, None, :]  # (B, T, S)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.n_layers,
            unroll=self.unroll,
        )(c, name="layers")
        x, kv = layers(x, kv, positions, mask, index)
        x = RMSNorm(c.rms_eps, name="norm")(x)
        logits = embed.attend(x)
        if cache is not None:
            cache = Cache(kv[0], kv[1], keys_valid)
        return logits, cache


def causal_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the positions ``loss_mask`` selects.

    ``loss_mask[b, t]`` says whether token ``t`` of row ``b`` is a target (a completion token,
    not prompt or padding); it is predicted from position ``t - 1``, so position 0 never counts.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> float(causal_lm_loss(logits, jnp.array([[0, 1, 2]]), jnp.array([[0, 0, 1]])))
        1.386...
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(target * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def generate(
    apply: Callable[..., tuple[jax.Array, Cache | None]],
    config: LlamaConfig,
    prompts: jax.Array,
    prompt_valid: jax.Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Greedy decoding with the KV cache: one prefill, then a ``lax.scan`` of one-token steps.

    Args:
        apply: ``(tokens, positions=, cache=, index=, valid=) -> (logits, cache)``, e.g.
            ``lambda *a, **k: model.apply({"params": params}, *a, **k)`` (merged params), or
            the same inside a function transformed by ``lorax.lora`` that takes the wrapped
            tree as an argument (factorized adapters).
        config: the architecture (cache shapes).
        prompts: ``(B, P)`` token ids, **left**-padded.
        prompt_valid: ``(B, P)`` bool, ``False`` on the padding.
        max_new_tokens: tokens to generate per row.
        eos_id: a row stops after emitting it.
        pad_id: written after a row stopped.

    Returns:
        ``(B, max_new_tokens)`` generated ids (``eos_id`` included, then ``pad_id``).
    """
    b, p = prompts.shape
    cache = init_cache(config, b, p + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    logits, cache = apply(prompts, positions=positions, cache=cache, index=0, valid=prompt_valid)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(prompts.dtype)
    lengths = jnp.sum(prompt_valid, axis=1)

    def step(carry, i):
        token, cache, done = carry
        logits, cache = apply(token[:, None], positions=(lengths + i)[:, None], cache=cache,
                              index=p + i)
        done = done | (token == eos_id)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, -1], axis=-1).astype(token.dtype))
        return (nxt, cache, done), token

    carry = (first, cache, jnp.zeros((b,), jnp.bool_))
    (last, _, _), tokens = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


HF_MODULES = {
    "self_attn/q_proj": "self_attn.q_proj",
    "self_attn/k_proj": "self_attn.k_proj",
    "self_attn/v_proj": "self_attn.v_proj",
    "self_attn/o_proj": "self_attn.o_proj",
    "mlp/gate_proj": "mlp.gate_proj",
    "mlp/up_proj": "mlp.up_proj",
    "mlp/down_proj": "mlp.down_proj",
}


def hf_name_map(config: LlamaConfig, prefix: str = "model.") -> dict[str, tuple[str, ...]]:
    """The :mod:`lorax.peft` name map: each stacked kernel's path -> the Hugging Face
    ``LlamaForCausalLM`` module of every layer (``model.layers.N.self_attn.q_proj``, ...).

    Example:
        >>> name_map = hf_name_map(LlamaConfig(n_layers=2))
        >>> name_map["layers/mlp/down_proj/kernel"]
        ('model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj')
    """
    return {f"layers/{path}/kernel": tuple(f"{prefix}layers.{i}.{module}"
                                           for i in range(config.n_layers))
            for path, module in HF_MODULES.items()}


def beam_search(
    apply: Callable[..., tuple[jax.Array, Cache | None]],
    config: LlamaConfig,
    prompts: jax.Array,
    prompt_valid: jax.Array,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    beams: int = 4,
    length_penalty: float = 1.0,
) -> jax.Array:
    """Beam search with the KV cache (arguments as :func:`generate`).

    Each row keeps ``beams`` live hypotheses and the ``beams`` best finished ones. A step scores
    ``2·beams`` candidates by their summed log-probabilities; those ending in ``eos_id`` join
    the finished set with score ``logp / length ** length_penalty`` (``length`` counts the
    generated tokens, ``eos_id`` included), the best ``beams`` others stay live (the cache rows
    are gathered from their parents). Hypotheses still live after ``max_new_tokens`` tokens
    are scored as finished. With ``beams`` at least the number of hypotheses, this is
    exhaustive search (``tests/test_llama.py`` checks that).

    Returns:
        ``(B, max_new_tokens)``: each row's best hypothesis (``eos_id`` included, then
        ``pad_id``).
    """
    b, p = prompts.shape
    k, n = beams, max_new_tokens
    cache = init_cache(config, b, p + n)
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    logits, cache = apply(prompts, positions=positions, cache=cache, index=0, valid=prompt_valid)
    cache = Cache(jnp.repeat(cache.k, k, axis=1), jnp.repeat(cache.v, k, axis=1),
                  jnp.repeat(cache.valid, k, axis=0))
    logits = jnp.repeat(logits[:, -1:], k, axis=1)  # (B, K, V)
    lengths = jnp.repeat(jnp.sum(prompt_valid, axis=1), k)
    vocab = logits.shape[-1]
    neg = jnp.float32(-1e30)
    rows = jnp.arange(b)[:, None]

    def step(carry, i):
        logits, cache, seqs, logp, done_seqs, done_scores = carry
        scores = logp[..., None] + jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top, flat = jax.lax.top_k(scores.reshape(b, k * vocab), 2 * k)  # (B, 2K)
        parent, token = flat // vocab, (flat % vocab).astype(prompts.dtype)
        cand = seqs[rows, parent].at[:, :, i].set(token)  # (B, 2K, N)
        is_eos = token == eos_id
        last = i == n - 1
        finishing = is_eos | last
        norm = top / (i + 1.0) ** length_penalty
        pool_scores = jnp.concatenate([done_scores, jnp.where(finishing, norm, neg)], axis=1)
        pool = jnp.concatenate([done_seqs, cand], axis=1)
        best, pick = jax.lax.top_k(pool_scores, k)
        done_seqs, done_scores = pool[rows, pick], best
        alive, keep = jax.lax.top_k(jnp.where(is_eos, neg, top), k)  # K live candidates
        seqs, parent, token = cand[rows, keep], parent[rows, keep], token[rows, keep]
        source = (rows * k + parent).reshape(-1)
        cache = Cache(cache.k[:, source], cache.v[:, source], cache.valid[source])
        logits, cache = apply(token.reshape(-1, 1), positions=(lengths + i)[:, None],
                              cache=cache, index=p + i)
        return (logits.reshape(b, k, vocab), cache, seqs, alive, done_seqs, done_scores), None

    seqs = jnp.full((b, k, n), pad_id, prompts.dtype)
    logp = jnp.where(jnp.arange(k) == 0, 0.0, neg)[None].repeat(b, axis=0)  # one live beam
    carry = (logits, cache, seqs, logp, seqs, jnp.full((b, k), neg))
    (_, _, _, _, done_seqs, _), _ = jax.lax.scan(step, carry, jnp.arange(n))
    return done_seqs[:, 0]  # a hypothesis is pad_id past its eos: it was never extended

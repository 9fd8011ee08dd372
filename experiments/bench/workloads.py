"""The benchmark's workloads: a model split into embed + body, its params and one batch.

A :class:`Workload` holds pure functions of ``(params, batch)``: the GPT decoder
(:func:`gpt_workload`, :mod:`experiments.gpt`), the pretrained MiniLM encoder with a regression
head (:func:`minilm_workload`, :mod:`experiments.bert`) and the pretrained SmolLM2-135M Llama on
the E2E experiment's shapes (:func:`smollm2_workload`, :mod:`experiments.llama`). The split at
the embedding lets the benchmark differentiate with respect to the embedded input (the frozen
floor, see :mod:`experiments.bench.steps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import lorax
from experiments import gpt

MODELS = ("gpt", "minilm", "smollm2")
"""Every model name ``--models`` accepts."""

QUICK_GPT = gpt.GPTConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=512,
                          max_len=32)
"""The tiny GPT of ``--quick``."""

QUICK_BATCH = 2
"""The batch size of ``--quick``."""

SMOLLM2_SEQ = 96
"""Tokens per sequence of the ``smollm2`` workload: the E2E experiment's chat prompt + reply."""

SMOLLM2_PROMPT = 56
"""Leading tokens of each ``smollm2`` sequence that are prompt (loss mask 0); the rest count."""


def quick_llama() -> Any:
    """The tiny random-init Llama of ``--quick`` (GQA: 4 query, 2 key/value heads; tied head).

    Example:
        >>> quick_llama().head_dim, quick_llama().n_kv_heads
        (16, 2)
    """
    from experiments import llama

    return llama.LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=128)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to benchmark, as pure functions of ``(params, batch)``.

    Attributes:
        name: The model name (one of :data:`MODELS`).
        params: The plain parameter tree (float32).
        batch: One training batch (a tuple of arrays).
        embed: ``(params, batch) -> h``, the float activations after the embedding lookup.
        body_loss: ``(params, h, batch) -> loss``, everything after the embedding.
        forward: ``(params, batch) -> outputs``, the inference forward pass.
        wrap_kwargs: Extra keyword arguments of :func:`lorax.wrap` (e.g. a ``train`` head).
        shapes: A description of the shapes, recorded in the results.
        config: The model's config (:class:`experiments.gpt.GPTConfig`,
            :class:`experiments.bert.BertConfig` or :class:`experiments.llama.LlamaConfig`).
    """

    name: str
    params: Any
    batch: tuple[Any, ...]
    embed: Callable[[Any, tuple[Any, ...]], jax.Array]
    body_loss: Callable[[Any, jax.Array, tuple[Any, ...]], jax.Array]
    forward: Callable[[Any, tuple[Any, ...]], Any]
    wrap_kwargs: dict[str, Any]
    shapes: dict[str, Any]
    config: Any = None

    def loss(self, params: Any, batch: tuple[Any, ...]) -> jax.Array:
        """The training loss, ``body_loss(params, embed(params, batch), batch)``."""
        return self.body_loss(params, self.embed(params, batch), batch)

    def wrap(self, rank: int) -> Any:
        """``lorax.wrap(params, rank, **wrap_kwargs)``: every kernel adapted at ``rank``."""
        return lorax.wrap(self.params, rank, **self.wrap_kwargs)


def gpt_workload(
    config: gpt.GPTConfig = gpt.GPTConfig(),  # noqa: B008
    batch_size: int = 8,
    seed: int = 0,
    abstract_params: bool = False,
) -> Workload:
    """The GPT decoder on a random next-token batch of ``(batch_size, config.max_len)``.

    Every kernel is adapted, the vocabulary head included; embeddings stay frozen.

    Args:
        config: The model's shapes.
        batch_size: Sequences per batch.
        seed: Seed of the parameters and the batch.
        abstract_params: ``jax.ShapeDtypeStruct`` params: enough for FLOP counts
            (:func:`~experiments.bench.cost.measure_flops`), not for running steps.

    Example:
        >>> w = gpt_workload(batch_size=2, abstract_params=True)
        >>> jax.eval_shape(w.embed, w.params, w.batch).shape
        (2, 128, 512)
    """
    init_key, data_key = jax.random.split(jax.random.key(seed))
    model, params = gpt.init(config, init_key, abstract=abstract_params)
    batch = gpt.random_batch(config, data_key, batch_size)

    def embed(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return model.apply({"params": params}, batch[0], method="embed")

    def body_loss(params: Any, h: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        logits = model.apply({"params": params}, h, method="decode")
        return gpt.next_token_loss(logits, batch[1])

    def forward(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return model.apply({"params": params}, batch[0])

    shapes = {**dataclasses.asdict(config), "batch": batch_size, "seq": config.max_len}
    return Workload("gpt", params, batch, embed, body_loss, forward, {}, shapes, config)


def minilm_workload(
    batch_size: int = 8, seq_len: int = 128, config: Any = None, seed: int = 0
) -> Workload:
    """The pretrained all-MiniLM-L6-v2 encoder with a fresh regression head on the mean pool.

    The head (``head/kernel`` ``(d, 1)`` and ``head/bias``) is new, so it is trained in full
    (``train="^head/"``); every encoder kernel is adapted. The loss is the mean squared error
    against random targets on a random batch of ``(batch_size, seq_len)`` token ids.

    Args:
        batch_size: Sentences per batch.
        seq_len: Tokens per sentence.
        config: A :class:`experiments.bert.BertConfig` for a randomly initialised encoder (tests,
            ``--quick``); ``None`` loads the pretrained weights.
        seed: Seed of the head, the data and (with ``config``) the encoder.

    Returns:
        The workload; its ``params`` are ``{"bert": <BertModel params>, "head": {...}}``.
    """
    import flax.linen as nn

    from experiments import bert, hf_bert

    keys = jax.random.split(jax.random.key(seed), 4)
    pretrained = config is None
    if pretrained:
        model, bert_params, _ = hf_bert.load_pretrained(max_length=seq_len)
        config = model.config
    else:
        ids = jnp.zeros((1, seq_len), jnp.int32)
        bert_params = jax.jit(bert.BertModel(config).init)(keys[0], ids, ids)["params"]
    head = nn.Dense(1, name="head")
    head_params = head.init(keys[1], jnp.zeros((1, config.hidden_size)))["params"]
    params = {"bert": bert_params, "head": head_params}
    input_ids = jax.random.randint(keys[2], (batch_size, seq_len), 0, config.vocab_size, jnp.int32)
    mask = jnp.ones((batch_size, seq_len), jnp.int32)
    targets = jax.random.normal(keys[3], (batch_size,), jnp.float32)
    batch = (input_ids, mask, targets)
    embeddings, encoder = bert.BertEmbeddings(config), bert.BertEncoder(config)

    def embed(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        ids = batch[0]
        return embeddings.apply(
            {"params": params["bert"]["embeddings"]}, ids, jnp.zeros_like(ids), True
        )

    def predict(params: Any, h: jax.Array, mask: jax.Array) -> jax.Array:
        key_mask = nn.make_attention_mask(jnp.ones_like(mask), mask, dtype=jnp.bool_)
        hidden = encoder.apply({"params": params["bert"]["encoder"]}, h, key_mask, True)
        pooled = bert.mean_pool(hidden, mask)
        return head.apply({"params": params["head"]}, pooled)[:, 0]

    def body_loss(params: Any, h: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        return jnp.mean((predict(params, h, batch[1]) - batch[2]) ** 2)

    def forward(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return predict(params, embed(params, batch), batch[1])

    shapes = {
        "d_model": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "d_ff": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "batch": batch_size,
        "seq": seq_len,
        "pretrained": pretrained,
    }
    return Workload("minilm", params, batch, embed, body_loss, forward,
                    {"train": "^head/"}, shapes, config)


def smollm2_workload(
    batch_size: int = 8,
    seq_len: int = SMOLLM2_SEQ,
    prompt_len: int = SMOLLM2_PROMPT,
    config: Any = None,
    seed: int = 0,
) -> Workload:
    """SmolLM2-135M (:mod:`experiments.llama`: GQA, tied 49k-vocabulary embedding) on a fixed
    chat-shaped batch: the E2E experiment's shapes.

    The batch is ``(tokens, loss_mask)``: ``(batch_size, seq_len)`` token ids drawn from
    ``seed`` and a mask that is 0 on the first ``prompt_len`` tokens (the prompt) and 1 on the
    rest (the reply); the loss is :func:`experiments.llama.causal_lm_loss`. Every projection of
    every layer is adapted (lorax's default targets); the tied embedding (lookup and
    vocabulary head) stays frozen. The model is ``Llama(config, unroll=True)``: straight-line
    layers, because XLA's cost model counts a while loop's body once.

    Args:
        batch_size: Sequences per batch.
        seq_len: Tokens per sequence.
        prompt_len: Leading tokens of each sequence without loss.
        config: A :class:`experiments.llama.LlamaConfig` for a randomly initialised model
            (tests, ``--quick``); ``None`` loads the pretrained weights
            (:func:`experiments.gguf_llama.load_smollm2`, float32).
        seed: Seed of the batch (and, with ``config``, of the parameters).

    Returns:
        The workload; its ``params`` are :class:`experiments.llama.Llama`'s tree.

    Raises:
        FileNotFoundError: Without ``config``, when the weights are not installed.
    """
    import flax.linen as nn

    from experiments import llama

    init_key, data_key = jax.random.split(jax.random.key(seed))
    pretrained = config is None
    if pretrained:
        from experiments import gguf_llama

        config, numpy_params, _ = gguf_llama.load_smollm2()
        params = jax.tree.map(jnp.asarray, numpy_params)
    else:
        dummy = jnp.zeros((1, seq_len), jnp.int32)
        params = jax.jit(llama.Llama(config).init)(init_key, dummy)["params"]
    model = llama.Llama(config, unroll=True)
    tokens = jax.random.randint(data_key, (batch_size, seq_len), 0, config.vocab_size, jnp.int32)
    loss_mask = jnp.broadcast_to(jnp.arange(seq_len) >= prompt_len, tokens.shape)
    batch = (tokens, loss_mask.astype(jnp.int32))
    lookup = nn.Embed(config.vocab_size, config.d_model)

    def embed(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return lookup.apply({"params": params["embed_tokens"]}, batch[0])

    def body_loss(params: Any, h: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        logits, _ = model.apply({"params": params}, batch[0], embedded=h)
        return llama.causal_lm_loss(logits, batch[0], batch[1])

    def forward(params: Any, batch: tuple[Any, ...]) -> jax.Array:
        return model.apply({"params": params}, batch[0])[0]

    shapes = {**dataclasses.asdict(config), "batch": batch_size, "seq": seq_len,
              "prompt": prompt_len, "pretrained": pretrained}
    return Workload("smollm2", params, batch, embed, body_loss, forward, {}, shapes, config)


def with_dtype(workload: Workload, dtype: str) -> Workload:
    """``workload`` with its floating parameters cast to ``dtype`` (the model then computes in
    it: Flax layers promote to their parameters' dtype).

    Example:
        >>> w = with_dtype(gpt_workload(QUICK_GPT, 1, abstract_params=True), "bfloat16")
        >>> str(w.params["head"]["kernel"].dtype), w.shapes["dtype"]
        ('bfloat16', 'bfloat16')
    """
    def cast(x: Any) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype))
        return x.astype(dtype)

    return dataclasses.replace(workload, params=jax.tree.map(cast, workload.params),
                               shapes={**workload.shapes, "dtype": dtype})


def make_workload(name: str, quick: bool = False, dtype: str = "float32",
                  batch_size: int | None = None) -> Workload:
    """The benchmark's workload ``name`` at full size, or tiny with ``quick``.

    Args:
        name: One of :data:`MODELS`.
        quick: Tiny shapes (random-init MiniLM-shaped encoder and Llama, tiny GPT) for smoke
            runs.
        dtype: The parameters' (hence the compute's) dtype, ``"float32"`` or ``"bfloat16"``.
        batch_size: Sequences per batch (default: 8, or :data:`QUICK_BATCH` with ``quick``).

    Returns:
        The workload.

    Raises:
        ValueError: For an unknown name.
    """
    return with_dtype(_make_workload(name, quick, batch_size), dtype)


def _make_workload(name: str, quick: bool, batch_size: int | None) -> Workload:
    batch = batch_size or (QUICK_BATCH if quick else 8)
    if name == "gpt":
        return gpt_workload(QUICK_GPT, batch) if quick else gpt_workload(batch_size=batch)
    if name == "minilm":
        if not quick:
            return minilm_workload(batch)
        from experiments import bert

        tiny = bert.BertConfig(vocab_size=512, hidden_size=96, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=384,
                               max_position_embeddings=32)
        return minilm_workload(batch, 32, tiny)
    if name == "smollm2":
        if not quick:
            return smollm2_workload(batch)
        return smollm2_workload(batch, 32, 16, quick_llama())
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")

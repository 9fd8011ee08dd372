"""lorax.peft against PEFT itself: the committed fixture ``experiments/fixtures/peft_bert/``.

The fixture was written by ``experiments/fixtures/make_peft_fixture.py`` with torch,
transformers and peft (a tiny random HF ``BertModel``, two PEFT LoRA adapters, PEFT's outputs).
These tests need none of them: they load the adapters into the Flax BERT of
``experiments/bert.py`` (names mapped by ``experiments/hf_bert.py``) and compare outputs, and
check that ``lorax.peft.save`` writes what PEFT wrote. PEFT's rules (pattern matching,
scaling) are re-stated here independently of lorax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import assert_close
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorax
import lorax.peft
from experiments import bert, hf_bert
from experiments.peft_map import peft_name_map
from lorax.peft import TorchParam

FIXTURE = pathlib.Path(bert.__file__).resolve().parent / "fixtures" / "peft_bert"
ADAPTERS = {"adapter": "lora_hidden", "adapter_rslora": "rslora_hidden"}
# Against PyTorch + PEFT (other kernels, other summation orders) over a whole model.
TOLERANCE = {"dtype": np.float32, "ulps": 128}


@pytest.fixture(scope="module")
def config() -> bert.BertConfig:
    return bert.BertConfig.from_json(FIXTURE / "config.json")


@pytest.fixture(scope="module")
def params(config):
    return hf_bert.params_from_hf_state_dict(load_file(FIXTURE / "model.safetensors"), config)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture(scope="module")
def inputs(reference):
    return tuple(reference[k] for k in ("input_ids", "attention_mask", "token_type_ids"))


@pytest.fixture(scope="module")
def forward(config):
    """Jitted ``lorax.lora(BertModel.apply)``; plain params go through it unchanged."""
    return jax.jit(lorax.lora(bert.BertModel(config).apply))


@pytest.fixture(scope="module")
def name_map(config):
    return peft_name_map(config)


def _lora_nodes(tree) -> dict[str, lorax.LoRA]:
    leaves = jax.tree.leaves(tree, is_leaf=lorax.is_lora)
    return {x.path: x for x in leaves if lorax.is_lora(x)}


def _boxes(tree) -> dict[str, lorax.FullyTrained]:
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, lorax.LoRA | lorax.FullyTrained)
    )[0]
    return {
        "/".join(str(k.key) for k in kp): x for kp, x in flat if isinstance(x, lorax.FullyTrained)
    }


# ---------------------------------------------------------------- PEFT's rules, re-stated


def _linear_modules(config) -> list[str]:
    return [r.torch_module for r in hf_bert.hf_name_map(config)
            if r.torch_param == "weight" and r.kind in ("linear", "qkv", "attn_out")]


def _all_modules(config) -> list[str]:
    return sorted({r.torch_module for r in hf_bert.hf_name_map(config)})


def _peft_view(adapter_config: dict, config) -> dict:
    """What PEFT builds from an adapter config on this BERT: per-module (rank, scale), etc."""
    targets = adapter_config["target_modules"]
    to_save = adapter_config.get("modules_to_save") or []

    def first(patterns: dict, module: str, default):
        for key, value in patterns.items():  # PEFT: get_pattern_key, first match in order
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    modules = {}
    for module in _linear_modules(config):
        if isinstance(targets, str):
            hit = re.fullmatch(targets, module) is not None
        else:
            hit = module in targets or any(module.endswith("." + t) for t in targets)
        if not hit:
            continue
        rank = first(adapter_config.get("rank_pattern") or {}, module, adapter_config["r"])
        alpha = first(adapter_config.get("alpha_pattern") or {}, module,
                      adapter_config["lora_alpha"])
        root = math.sqrt(rank) if adapter_config.get("use_rslora") else rank
        modules[module] = (rank, alpha / root)
    return {
        "modules": modules,
        "modules_to_save": {m for m in _all_modules(config) if any(m.endswith(e) for e in to_save)},
        "lora_dropout": adapter_config.get("lora_dropout", 0.0),
        "peft_type": adapter_config["peft_type"],
        "use_rslora": adapter_config.get("use_rslora", False),
        "bias": adapter_config.get("bias", "none"),
        "fan_in_fan_out": adapter_config.get("fan_in_fan_out", False),
        "use_dora": adapter_config.get("use_dora", False),
    }


def _read_config(directory) -> dict:
    return json.loads((pathlib.Path(directory) / "adapter_config.json").read_text())


# ------------------------------------------------------------------------- against PEFT


def test_fixture_is_small_and_from_peft():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total < 200 * 1024
    with safe_open(FIXTURE / "reference.safetensors", "numpy") as handle:
        assert handle.metadata()["torch_version"] == "2.13.0+cpu"
        assert handle.metadata()["peft_version"]


def test_base_model_matches_hf(forward, params, inputs, reference):
    hidden = np.asarray(forward({"params": params}, *inputs))
    assert_close(hidden, reference["base_hidden"], **TOLERANCE)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_load_matches_peft_outputs(adapter, config, params, forward, inputs, reference, name_map):
    tree = lorax.peft.load(FIXTURE / adapter, params, name_map=name_map)
    expected = reference[ADAPTERS[adapter]]
    assert np.abs(expected - reference["base_hidden"]).max() > 0.1  # the adapter matters
    factorized = np.asarray(forward({"params": tree}, *inputs))
    assert_close(factorized, expected, **TOLERANCE)
    merged = np.asarray(forward({"params": lorax.merge(tree)}, *inputs))
    assert_close(merged, expected, **TOLERANCE)

    # Every adapted module has PEFT's rank and scale (rank_pattern / alpha_pattern applied).
    view = _peft_view(_read_config(FIXTURE / adapter), config)
    flax_of = {row.torch_module: row.flax_path for row in hf_bert.hf_name_map(config)
               if row.torch_param == "weight"}
    nodes = _lora_nodes(tree)
    flat_params = traverse_util.flatten_dict(params, sep="/")
    assert set(nodes) == {flax_of[m] for m in view["modules"]}
    for module, (rank, scale) in view["modules"].items():
        node = nodes[flax_of[module]]
        assert (node.rank, node.scale) == (rank, scale), module
        assert node.dropout == view["lora_dropout"]
        assert node.w is flat_params[node.path]  # the caller's kernel, not a copy


def test_fixture_exercises_pattern_semantics(config, params, name_map):
    """Full-name, suffix-regex and short keys, rsLoRA and modules_to_save all occur."""
    nodes = _lora_nodes(lorax.peft.load(FIXTURE / "adapter", params, name_map=name_map))
    assert (nodes["encoder/layer_1/attention/value/kernel"].rank,
            nodes["encoder/layer_1/attention/value/kernel"].scale) == (2, 1.5)
    assert nodes["encoder/layer_0/output/kernel"].rank == 6  # key "0.output.dense"
    assert nodes["encoder/layer_1/output/kernel"].rank == 4
    assert nodes["encoder/layer_0/attention/out/kernel"].rank == 4  # not "...attention.output"
    assert nodes["encoder/layer_1/attention/key/kernel"].scale == 16 / 4  # key "key"
    rs = _lora_nodes(lorax.peft.load(FIXTURE / "adapter_rslora", params, name_map=name_map))
    assert rs["encoder/layer_0/attention/query/kernel"].scale == 8 / math.sqrt(2)
    assert rs["encoder/layer_1/attention/query/kernel"].scale == 8 / math.sqrt(4)


def test_load_boxes_modules_to_save(params, name_map):
    tree = lorax.peft.load(FIXTURE / "adapter", params, name_map=name_map)
    boxes = _boxes(tree)
    assert set(boxes) == {"encoder/layer_1/output_norm/scale", "encoder/layer_1/output_norm/bias"}
    tensors = load_file(FIXTURE / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.encoder.layer.1.output.LayerNorm."
    np.testing.assert_array_equal(boxes["encoder/layer_1/output_norm/scale"].value,
                                  tensors[prefix + "weight"])
    np.testing.assert_array_equal(boxes["encoder/layer_1/output_norm/bias"].value,
                                  tensors[prefix + "bias"])
    base = params["encoder"]["layer_1"]["output_norm"]["scale"]
    assert not np.array_equal(base, tensors[prefix + "weight"])  # PEFT trained a copy


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_save_reproduces_peft_files(adapter, config, params, name_map, tmp_path):
    tree = lorax.peft.load(FIXTURE / adapter, params, name_map=name_map)
    theirs_config = _read_config(FIXTURE / adapter)
    written = lorax.peft.save(tmp_path, tree, name_map=name_map,
                              use_rslora=theirs_config["use_rslora"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]

    theirs = load_file(FIXTURE / adapter / "adapter_model.safetensors")
    ours = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    with safe_open(tmp_path / "adapter_model.safetensors", "numpy") as handle:
        assert handle.metadata() == {"format": "pt"}

    ours_config = _read_config(tmp_path)
    assert ours_config == written
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
                "fan_in_fan_out", "use_dora", "target_modules", "rank_pattern", "alpha_pattern",
                "modules_to_save"):
        assert key in ours_config, key
    assert (ours_config["r"], ours_config["lora_alpha"]) == (
        theirs_config["r"], theirs_config["lora_alpha"])
    assert _peft_view(ours_config, config) == _peft_view(theirs_config, config)
    assert ours_config["fan_in_fan_out"] is False and ours_config["bias"] == "none"


def test_saved_adapter_loads_back_to_same_outputs(params, forward, inputs, reference, name_map,
                                                  tmp_path):
    tree = lorax.peft.load(FIXTURE / "adapter", params, name_map=name_map)
    lorax.peft.save(tmp_path, tree, name_map=name_map)
    again = lorax.peft.load(tmp_path, params, name_map=name_map)
    hidden = np.asarray(forward({"params": again}, *inputs))
    assert_close(hidden, reference["lora_hidden"], **TOLERANCE)


# ---------------------------------------------------------------------- round trips


TINY = bert.BertConfig(vocab_size=24, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=20, max_position_embeddings=10)


def _tiny_params():
    """Random TINY params via the HF converter (cheaper than an eager ``init``)."""
    rng = np.random.default_rng(0)
    shapes = hf_bert.param_shapes(TINY)
    state = {row.torch_name: rng.standard_normal(hf_bert.torch_shape(row.kind,
                                                                     shapes[row.flax_path]))
             .astype(np.float32) for row in hf_bert.hf_name_map(TINY)}
    return hf_bert.params_from_hf_state_dict(state, TINY)


def _perturb(tree, seed: int = 1):
    """Random non-zero ``b`` factors and trained values (``wrap`` starts b at zero)."""
    rng = np.random.default_rng(seed)

    def change(leaf):
        if isinstance(leaf, lorax.LoRA):
            b = rng.standard_normal(leaf.b.shape).astype(np.float32)
            return dataclasses.replace(leaf, b=jnp.asarray(b).astype(leaf.b.dtype))
        if isinstance(leaf, lorax.FullyTrained):
            noise = rng.standard_normal(leaf.value.shape).astype(np.float32)
            return lorax.FullyTrained(jnp.asarray(leaf.value + noise))
        return leaf

    return jax.tree.map(change, tree,
                        is_leaf=lambda x: isinstance(x, lorax.LoRA | lorax.FullyTrained))


def _assert_same_factors(ours: dict, back: dict):
    assert set(ours) == set(back)
    for path, node in ours.items():
        other = back[path]
        for field in ("a", "b"):
            x, y = np.asarray(getattr(node, field)), np.asarray(getattr(other, field))
            assert x.dtype == y.dtype and x.shape == y.shape, (path, field)
            assert x.tobytes() == y.tobytes(), (path, field)  # bit-exact
        for field in ("rank", "scale", "n_stack", "n_in", "path", "dropout"):
            assert getattr(node, field) == getattr(other, field), (path, field)
        assert other.w is not None


def test_round_trip_from_wrap_is_bit_exact(tmp_path):
    params = _tiny_params()
    name_map = peft_name_map(TINY)
    lp = _perturb(lorax.wrap(
        params, rank=3, alpha=6.0, dropout=0.05,
        targets=["query", "key", "value", "attention/out", "intermediate", "output/kernel",
                 "word_embeddings"],
        rank_pattern={"layer_0/attention/value": 2}, alpha_pattern={"intermediate": 5.0},
        train="layer_1/output_norm/scale",
    ))
    config = lorax.peft.save(tmp_path, lp, name_map=name_map, base_model_name_or_path="tiny")
    assert config["base_model_name_or_path"] == "tiny"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (3, 6, 0.05)
    assert config["rank_pattern"] == {"encoder.layer.0.attention.self.value": 2}
    assert config["alpha_pattern"] == {"encoder.layer.0.intermediate.dense": 5,
                                       "encoder.layer.1.intermediate.dense": 5}
    assert config["modules_to_save"] == ["encoder.layer.1.output.LayerNorm"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in keys
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_B" in keys
    assert "base_model.model.encoder.layer.1.output.LayerNorm.bias" in keys  # whole module

    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    _assert_same_factors(_lora_nodes(lp), _lora_nodes(back))
    boxes = _boxes(back)
    scale_path, bias_path = "encoder/layer_1/output_norm/scale", "encoder/layer_1/output_norm/bias"
    assert set(boxes) == {scale_path, bias_path}
    np.testing.assert_array_equal(boxes[scale_path].value, _boxes(lp)[scale_path].value)
    np.testing.assert_array_equal(boxes[bias_path].value,
                                  params["encoder"]["layer_1"]["output_norm"]["bias"])

    ids = np.array([[3, 5, 7, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0]], np.int32)
    forward = jax.jit(lorax.lora(bert.BertModel(TINY).apply))
    np.testing.assert_array_equal(forward({"params": back}, ids, mask),
                                  forward({"params": lp}, ids, mask))


def test_round_trip_rslora_bf16(tmp_path):
    params = _tiny_params()
    name_map = peft_name_map(TINY)
    lp = _perturb(lorax.wrap(params, rank=4, alpha=7.0, rslora=True, dtype=jnp.bfloat16,
                             targets=["query", "value"], rank_pattern={"layer_1": 3}))
    config = lorax.peft.save(tmp_path, lp, name_map=name_map, use_rslora=True)
    assert config["use_rslora"] is True and config["alpha_pattern"] == {}
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"].shape == (3, 12)
    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    _assert_same_factors(_lora_nodes(lp), _lora_nodes(back))
    as_f32 = lorax.peft.load(tmp_path, params, name_map=name_map, dtype=jnp.float32)
    assert all(n.a.dtype == jnp.float32 for n in _lora_nodes(as_f32).values())


def test_round_trip_stacked_kernel(tmp_path):
    params = {"layers": {"kernel": jnp.ones((3, 8, 6))}, "head": {"kernel": jnp.ones((6, 4))}}
    layers = tuple(f"model.layers.{i}.fc" for i in range(3))
    name_map = {"layers/kernel": TorchParam(layers), "head/kernel": "model.head"}
    lp = _perturb(lorax.wrap(params, rank=2, stacked={"layers": 1}))
    lorax.peft.save(tmp_path, lp, name_map=name_map)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.fc.lora_B.weight"],
                                  np.asarray(lp["layers"]["kernel"].b[1]).T)
    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    _assert_same_factors(_lora_nodes(lp), _lora_nodes(back))

    with pytest.raises(NotImplementedError, match="tuple of module paths"):
        lorax.peft.save(tmp_path, lp, name_map={"layers/kernel": "x", "head/kernel": "y"})


def test_callable_name_map(tmp_path):
    params = {"blocks_0": {"fc": {"kernel": jnp.ones((8, 4))}}}

    def name_map(path: str) -> str | None:
        m = re.fullmatch(r"blocks_(\d+)/fc/kernel", path)
        return m and f"h.{m[1]}.mlp.fc"

    lp = _perturb(lorax.wrap(params, rank=2))
    config = lorax.peft.save(tmp_path, lp, name_map=name_map)
    assert config["target_modules"] == ["h.0.mlp.fc"]
    _assert_same_factors(_lora_nodes(lp),
                         _lora_nodes(lorax.peft.load(tmp_path, params, name_map=name_map)))


def test_pattern_keys_match_only_their_module(tmp_path):
    """A module path that is a dot-suffix of another ('fc', 'block.fc') gets an anchored key."""
    params = {"fc": {"kernel": jnp.ones((8, 4))}, "block": {"fc": {"kernel": jnp.ones((8, 4))}},
              "head": {"kernel": jnp.ones((4, 4))}}
    name_map = {"fc/kernel": "fc", "block/fc/kernel": "block.fc", "head/kernel": "head"}
    lp = _perturb(lorax.wrap(params, rank=4, rank_pattern={"^fc": 2},
                             alpha_pattern={"^block": 3.0}))
    config = lorax.peft.save(tmp_path, lp, name_map=name_map)
    assert config["rank_pattern"] == {"^fc": 2}
    assert config["alpha_pattern"] == {"block.fc": 3}
    for module, rank, alpha in (("fc", 2, 8), ("block.fc", 4, 3), ("head", 4, 8)):
        got_rank = lorax.peft.pattern_value(config["rank_pattern"], module, config["r"])
        got_alpha = lorax.peft.pattern_value(config["alpha_pattern"], module,
                                             config["lora_alpha"])
        assert (got_rank, got_alpha) == (rank, alpha), module
    _assert_same_factors(_lora_nodes(lp),
                         _lora_nodes(lorax.peft.load(tmp_path, params, name_map=name_map)))


def test_pattern_value_follows_peft():
    patterns = {"0.output.dense": 6, "key": 16}
    assert lorax.peft.pattern_value(patterns, "encoder.layer.0.output.dense", 4) == 6
    assert lorax.peft.pattern_value(patterns, "encoder.layer.10.output.dense", 4) == 4
    assert lorax.peft.pattern_value(patterns, "encoder.layer.0.attention.output.dense", 4) == 4
    assert lorax.peft.pattern_value(patterns, "encoder.layer.3.attention.self.key", 8) == 16
    assert lorax.peft.pattern_value(patterns, "encoder.layer.3.attention.self.monkey", 8) == 8


# --------------------------------------------------------------------------- errors


@pytest.fixture
def adapter_copy(tmp_path) -> pathlib.Path:
    directory = tmp_path / "adapter"
    shutil.copytree(FIXTURE / "adapter", directory)
    return directory


def _edit_config(directory: pathlib.Path, **changes) -> None:
    config = _read_config(directory)
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def test_load_rejects_module_missing_from_name_map(params, name_map):
    partial = {k: v for k, v in name_map.items() if k != "encoder/layer_1/attention/query/kernel"}
    key = "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        lorax.peft.load(FIXTURE / "adapter", params, name_map=partial)


def test_load_rejects_wrong_shape(params, name_map, adapter_copy):
    tensors = load_file(adapter_copy / "adapter_model.safetensors")
    key = "base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight"
    tensors[key] = np.zeros((63, 4), np.float32)
    save_file(tensors, adapter_copy / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape(repr(key)) + r" has shape \[63, 4\]"):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


def test_load_rejects_rank_that_disagrees_with_config(params, name_map, adapter_copy):
    _edit_config(adapter_copy, rank_pattern={})  # layer 1 value has r=2 tensors, config says 4
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.lora_A.weight.*r=4"):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


def test_load_rejects_lone_factor(params, name_map, adapter_copy):
    tensors = load_file(adapter_copy / "adapter_model.safetensors")
    del tensors["base_model.model.encoder.layer.0.attention.self.key.lora_B.weight"]
    save_file(tensors, adapter_copy / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"attention\.self\.key\.lora_A\.weight.*no lora_B"):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


def test_load_rejects_unplaceable_parameter(params, name_map, adapter_copy):
    tensors = load_file(adapter_copy / "adapter_model.safetensors")
    key = "base_model.model.pooler.dense.weight"
    tensors[key] = np.zeros((32, 32), np.float32)
    save_file(tensors, adapter_copy / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True (DoRA)"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ],
)
def test_load_rejects_unsupported_settings(params, name_map, adapter_copy, changes, message):
    _edit_config(adapter_copy, **changes)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        lorax.peft.load(adapter_copy, params, name_map=name_map)
    assert "adapter_config.json" in str(info.value)


@pytest.mark.parametrize("content", [b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"])
def test_load_rejects_corrupted_safetensors(params, name_map, adapter_copy, content):
    path = adapter_copy / "adapter_model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


def test_load_rejects_missing_and_pickled_files(params, name_map, adapter_copy, tmp_path):
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(ValueError, match="safe_serialization=True"):
        lorax.peft.load(adapter_copy, params, name_map=name_map)
    with pytest.raises(ValueError, match="no PEFT adapter config"):
        lorax.peft.load(tmp_path / "nowhere", params, name_map=name_map)
    (adapter_copy / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="could not read the PEFT adapter config"):
        lorax.peft.load(adapter_copy, params, name_map=name_map)


def test_load_rejects_wrapped_params(params, name_map):
    wrapped = lorax.wrap(params, rank=2, targets="query")
    with pytest.raises(ValueError, match="without LoRA nodes"):
        lorax.peft.load(FIXTURE / "adapter", wrapped, name_map=name_map)


def test_save_errors(tmp_path):
    params = _tiny_params()
    name_map = peft_name_map(TINY)
    lp = lorax.wrap(params, rank=2, targets=["query", "intermediate/kernel"])
    partial = {k: v for k, v in name_map.items() if "intermediate" not in k}
    with pytest.raises(ValueError, match="'encoder/layer_0/intermediate/kernel' has no PyTorch"):
        lorax.peft.save(tmp_path, lp, name_map=partial)

    both = lorax.wrap(params, rank=2, targets=["intermediate/kernel"],
                      train="layer_0/intermediate/bias")
    with pytest.raises(ValueError, match="PEFT cannot train both"):
        lorax.peft.save(tmp_path, both, name_map=name_map)

    node = lp["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    lp["encoder"]["layer_0"]["attention"]["query"]["kernel"] = dataclasses.replace(
        node, dropout=0.5)
    with pytest.raises(ValueError, match="one lora_dropout"):
        lorax.peft.save(tmp_path, lp, name_map=name_map)

    with pytest.raises(ValueError, match="expected `tree` to hold LoRA nodes"):
        lorax.peft.save(tmp_path, params, name_map=name_map)
    assert not list(tmp_path.iterdir())  # nothing written by the failed saves

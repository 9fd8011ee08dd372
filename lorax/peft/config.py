"""``adapter_config.json``: PEFT's config rules, read and written as PEFT does.

Reading accepts only plain LoRA that lorax computes exactly (:func:`read_config`); ranks and
alphas per module follow PEFT's ``rank_pattern``/``alpha_pattern`` matching
(:func:`pattern_value`, ``peft.utils.other.get_pattern_key``), and ``modules_to_save`` PEFT's
suffix matching (``peft.utils.other._set_trainable``). Writing (:func:`make_config`) lists
the most common rank and alpha and patterns for the modules that differ.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorax.peft.files import CONFIG_NAME, atomic_write

# PEFT's LoraConfig defaults for `r` and `lora_alpha`.
_DEFAULT_RANK = 8
_DEFAULT_ALPHA = 8
# Config settings that change what the adapter computes and that lorax does not implement.
_UNSUPPORTED_IF_SET = (
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)
# init_lora_weights methods that also rewrite the base weights: the adapter needs that residual
# base model, unless PEFT converted it (save_pretrained(path_initial_model_for_weight_conversion)).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ---------------------------------------------------------------------------------------------
# reading


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks ``adapter_config.json``: a LoRA adapter lorax can compute exactly.

    Raises:
        ValueError: naming the file and setting, for a missing or malformed file, a
            ``peft_type`` other than ``"LORA"``, ``fan_in_fan_out``, ``bias != "none"`` or a
            LoRA variant lorax does not implement (LoRA bias, layer replication, ...).

    Example:
        >>> import json, tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (pathlib.Path(d) / "adapter_config.json").write_text(
        ...         json.dumps({"peft_type": "LORA", "r": 8, "lora_bias": True}))
        ...     read_config(d)
        Traceback (most recent call last):
        ...
        ValueError: .../adapter_config.json sets lora_bias=True, which lorax.peft does not ...
    """
    path = Path(directory) / CONFIG_NAME
    config = _read_json(path)
    _check_supported(path, config)
    _check_rank_and_alpha(path, config)
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"no PEFT adapter config at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read the PEFT adapter config {str(path)!r}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object in {str(path)!r}, got {type(config).__name__}")
    return config


def _check_supported(path: Path, config: dict[str, Any]) -> None:
    """Refuses settings that make the adapter compute something other than plain LoRA."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path} has peft_type={peft_type!r}; lorax.peft reads only 'LORA'")
    if config.get("fan_in_fan_out"):
        raise ValueError(
            f"{path} sets fan_in_fan_out=True (Conv1D-style weights), which lorax.peft does not "
            "support"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{path} sets bias={config['bias']!r} (trained biases), which lorax.peft does not "
            "support; only 'none'"
        )
    for key in _UNSUPPORTED_IF_SET:
        if config.get(key):
            raise ValueError(
                f"{path} sets {key}={config[key]!r}, which lorax.peft does not support"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{path} has init_lora_weights={init!r}: the adapter belongs to a modified base "
            "model; convert it with PEFT's save_pretrained(path_initial_model_for_weight_"
            "conversion=...) first"
        )


def _check_rank_and_alpha(path: Path, config: dict[str, Any]) -> None:
    rank, alpha = config.get("r", _DEFAULT_RANK), config.get("lora_alpha", _DEFAULT_ALPHA)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path} has r={rank!r}; expected a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"{path} has lora_alpha={alpha!r}; expected a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{path} has {key}={config[key]!r}; expected a dict")


# ---------------------------------------------------------------------------------------------
# PEFT's matching rules (peft.utils.other.get_pattern_key, peft.utils.other._set_trainable)


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """The value PEFT takes from ``rank_pattern``/``alpha_pattern`` for ``module``.

    PEFT tries the keys in order and uses the first that matches a dot-separated suffix of the
    module path as a regex (``re.match(rf"(.*\\.)?({key})$", module)``). Note that PEFT writes
    ``adapter_config.json`` with sorted keys, which is the order it applies on loading.

    Example:
        >>> pattern_value({"0.output.dense": 6}, "encoder.layer.0.output.dense", 4)
        6
        >>> pattern_value({"0.output.dense": 6}, "encoder.layer.10.output.dense", 4)
        4
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def pattern_key(module: str, others: Sequence[str]) -> str:
    """``module`` as a rank/alpha pattern key that PEFT matches to ``module`` alone among
    ``others`` (see :func:`pattern_value`).

    Example:
        >>> pattern_key("fc", ["fc", "out"]), pattern_key("fc", ["fc", "block.fc"])
        ('fc', '^fc')
    """
    for key in (module, re.escape(module)):
        if not any(other != module and re.match(rf"(.*\.)?({key})$", other) for other in others):
            return key
    # `module` is a dot-suffix of another module path ("fc" and "block.fc"): anchor it.
    return "^" + re.escape(module)


def rank_and_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and LoRA scale PEFT gives ``module``: ``r``/``lora_alpha`` or their
    patterns, and ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).

    Example:
        >>> rank_and_scale({"r": 4, "lora_alpha": 8, "rank_pattern": {"out": 2}}, "out")
        (2, 4.0)
    """
    rank = int(pattern_value(config.get("rank_pattern"), module, config.get("r", _DEFAULT_RANK)))
    alpha = pattern_value(config.get("alpha_pattern"), module,
                          config.get("lora_alpha", _DEFAULT_ALPHA))
    use_rslora = bool(config.get("use_rslora", False))
    return rank, alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_of(scale: float, rank: int, use_rslora: bool) -> float | int:
    """The ``lora_alpha`` that gives ``scale`` at ``rank``: the inverse of
    :func:`rank_and_scale`, snapped to 12 significant digits when that is a float64 rounding
    away, and an ``int`` when whole.

    Example:
        >>> alpha_of(2.0, 4, False), alpha_of(0.1, 3, False), alpha_of(0.5, 4, True)
        (8, 0.3, 1)
    """
    value = float(scale) * (math.sqrt(rank) if use_rslora else rank)
    snapped = float(f"{value:.12g}")
    if math.isclose(snapped, value, rel_tol=1e-13, abs_tol=0.0):
        value = snapped
    return int(value) if value.is_integer() else value


def module_to_save_matches(entry: str, module: str) -> bool:
    """Whether the ``modules_to_save`` entry selects ``module``: PEFT matches by plain string
    suffix, without a dot boundary.

    Example:
        >>> module_to_save_matches("classifier", "bert.classifier"), module_to_save_matches(
        ...     "fier", "classifier")
        (True, True)
    """
    return module.endswith(entry)


def excluded_by_modules_to_save(entry: str, module: str) -> bool:
    """Whether PEFT keeps LoRA off ``module`` for the ``modules_to_save`` entry: it never
    adapts a module inside (or equal to) a module it trains in full.

    Example:
        >>> excluded_by_modules_to_save("pooler", "bert.pooler.dense")
        True
    """
    return re.match(rf"(^|.*\.){entry}($|\..*)", module) is not None


# ---------------------------------------------------------------------------------------------
# writing


def _most_common(values: Sequence[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))  # ties: the largest value


def make_config(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float | int],
    *,
    modules: Sequence[str],
    modules_to_save: Sequence[str],
    dropout: float,
    use_rslora: bool,
    use_dora: bool,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of LoRA modules with ``ranks`` and ``alphas`` (by module).

    ``r``/``lora_alpha`` are the most common values (ties: the largest); modules that differ
    get a :func:`pattern_key` unique among ``modules`` (every mapped module of the model).

    Example:
        >>> config = make_config({"fc": 4, "out": 2}, {"fc": 8, "out": 8}, modules=["fc", "out"],
        ...                      modules_to_save=[], dropout=0.0, use_rslora=False,
        ...                      use_dora=False, base_model_name_or_path=None)
        >>> config["r"], config["rank_pattern"], config["target_modules"]
        (4, {'out': 2}, ['fc', 'out'])
    """
    rank = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    others = sorted(modules)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": bool(use_rslora),
        "target_modules": sorted(ranks),
        "rank_pattern": {pattern_key(m, others): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {pattern_key(m, others): a for m, a in alphas.items() if a != alpha},
        "modules_to_save": sorted(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": bool(use_dora),
    }


def write_config(directory: Path, config: Mapping[str, Any]) -> None:
    """Writes ``config`` atomically as ``directory/adapter_config.json`` (sorted keys, as PEFT
    writes it, which is also the order PEFT applies the patterns in).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_config(Path(d), {"r": 4, "peft_type": "LORA"})
        ...     (Path(d) / "adapter_config.json").read_text().split()
        ['{', '"peft_type":', '"LORA",', '"r":', '4', '}']
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_write(directory / CONFIG_NAME, write)

"""The two files of a PEFT adapter directory: their names, the tensor file, atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

WEIGHTS_NAME = "adapter_model.safetensors"
"""The tensor file PEFT reads and writes (``safe_serialization=True``, its default)."""

CONFIG_NAME = "adapter_config.json"
"""PEFT's adapter config file."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file next to ``path``, then renames it to ``path``
    (``os.replace``), so ``path`` is never half-written; the temporary file is removed on error.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_write(Path(d) / "x.txt", lambda tmp: Path(tmp).write_text("hi"))
        ...     (Path(d) / "x.txt").read_text(), len(list(Path(d).iterdir()))
        ('hi', 1)
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_tensors(directory: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` atomically as ``directory/adapter_model.safetensors``, with the
    ``{"format": "pt"}`` metadata that PyTorch readers expect.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_tensors(Path(d), {"x": np.zeros(2, np.float32)})
        ...     read_tensors(Path(d))["x"].shape
        (2,)
    """
    atomic_write(
        directory / WEIGHTS_NAME,
        lambda tmp: safetensors.numpy.save_file(dict(tensors), tmp, metadata={"format": "pt"}),
    )


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The tensors of ``directory/adapter_model.safetensors``.

    Raises:
        ValueError: naming the file, when it is missing (and saying so when a pickled
            ``adapter_model.bin`` is there instead) or unreadable.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     read_tensors(Path(d))
        Traceback (most recent call last):
        ...
        ValueError: no PEFT adapter weights at '.../adapter_model.safetensors'
    """
    path = directory / WEIGHTS_NAME
    if not path.exists():
        legacy = directory / "adapter_model.bin"
        extra = (
            f"; found {legacy.name}, a pickle: re-save it with PEFT's safe_serialization=True"
            if legacy.exists()
            else ""
        )
        raise ValueError(f"no PEFT adapter weights at {str(path)!r}{extra}")
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as err:
        raise ValueError(f"could not read the safetensors file {str(path)!r}: {err}") from None

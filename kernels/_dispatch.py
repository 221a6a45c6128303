"""Which path an op takes: the Triton kernel or its torch reference.

The rule (issue 5): Triton on CUDA tensors; the torch reference on CPU tensors; Triton on CPU tensors only when
the Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton when a kernel is decorated, so it must be set
before this package is imported). `backend("torch")` / `backend("triton")` force a path for a block of code
(tests and benchmarks), `backend("auto")` restores the rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

try:  # triton ships only for x86_64 Linux; everything still works on the torch path without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

_BACKENDS = ("auto", "triton", "torch")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("cocoon_kernels_backend", default="auto")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto one path: "triton", "torch", or "auto" (the default rule)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {', '.join(_BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op on these tensors should run its Triton kernel."""
    mode = _backend.get()
    if mode == "torch" or not HAS_TRITON:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda:
        return True
    if not INTERPRET:
        if mode == "triton":
            raise RuntimeError(
                "backend('triton') on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing cocoon_faas.kernels, or move the tensors to a GPU"
            )
        return False
    return True


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16")

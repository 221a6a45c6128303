"""Fused bias add + GELU (the intermediate activation of a BERT feed-forward block).

Math: y = gelu(x + b) with the exact (erf) GELU BERT uses: gelu(h) = 0.5 * h * (1 + erf(h / sqrt(2))),
computed in fp32. The bias broadcasts along the last dimension.

Memory traffic: read M*N (x) + N (bias, cached), write M*N: a pure streaming op, bandwidth-bound; fusing saves the
extra read+write of the unfused bias add that a separate GEMM epilogue-free linear would need.

`linear_bias_gelu` is the whole step (GEMM, bias, GELU) as a model calls it: on the Triton path the GEMM runs
bias-free and the bias rides in our fused kernel; on the torch path the bias rides in the GEMM itself (addmm
initializes the output with it, no extra pass), which is the cheaper place on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_dtype, use_triton
from .linear import linear_t

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_gelu_kernel(X, B, Y, numel, N, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
        y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float() + bias.float()).to(x.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), bias broadcast over the last dimension of `x`."""
    check_dtype(x, "bias_gelu")
    n = x.shape[-1]
    if bias.shape != (n,):
        raise ValueError(f"bias_gelu: bias must have shape ({n},), got {tuple(bias.shape)}")
    if not use_triton(x, bias):
        return bias_gelu_reference(x, bias)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    numel = xc.numel()
    if numel:
        block = 1024
        _bias_gelu_kernel[(triton.cdiv(numel, block),)](xc, bias.contiguous(), y, numel, n, BLOCK=block, num_warps=4)
    return y


def linear_bias_gelu(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight_t + bias), `weight_t` [in, out] (see `linear`): a BERT layer's up-projection."""
    if not use_triton(x, weight_t, bias):
        check_dtype(x, "bias_gelu")
        return F.gelu(linear_t(x, weight_t, bias))
    return bias_gelu(linear_t(x, weight_t), bias)

"""Fused bias add + GELU (the intermediate activation of a BERT feed-forward block).

Math: y = gelu(x + b) with the exact (erf) GELU BERT uses: gelu(h) = 0.5 * h * (1 + erf(h / sqrt(2))),
computed in fp32. The bias broadcasts along the last dimension.

Memory traffic: read M*N (x) + N (bias, cached), write M*N: a pure streaming op, bandwidth-bound; fusing saves the
extra read+write of the unfused bias add that a separate GEMM epilogue-free linear would need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_dtype, use_triton

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

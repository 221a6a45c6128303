"""LayerNorm with an optional fused residual add (the post-LN step of a BERT layer).

Math, per row x of length N (h = x + residual when a residual is given):
    mean = sum(h) / N;  var = sum((h - mean)^2) / N;  y = (h - mean) / sqrt(var + eps) * weight + bias
Statistics are kept in fp32 whatever the storage dtype.

Memory traffic per row: read N (x) + N (residual, if any) + 2N (weight, bias; cached across rows), write N.
The kernel holds one whole row in registers (one program per row), so each element is read from HBM once:
at large M it is bandwidth-bound at (2 or 3) * N * M * bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_kernel(
        X, R, W, B, Y, stride_x, stride_r, stride_y, N, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / N
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = d * rstd * w + b
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    h = x if residual is None else x + residual
    return F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of `x` (after adding `residual`, if given)."""
    check_dtype(x, "layer_norm")
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"layer_norm: weight/bias must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if not use_triton(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps, residual)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = next_pow2(n)
        _layer_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), bias.contiguous(), y, x2.stride(0), r2.stride(0), y.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )
    return y.reshape(x.shape)

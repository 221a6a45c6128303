"""RMSNorm, alone or fused with the residual add before it (the pre-norm step of a Llama layer).

Math, per row x of length N:  y = x / sqrt(sum(x^2) / N + eps) * weight  (statistics in fp32).
Fused form: h = x + residual; returns (rms_norm(h), h) so the caller keeps h as the next residual.

Memory traffic per row: read N (+N residual), write N (+N for h), weight cached across rows. One program holds one
row, so each element crosses HBM once; at large M the op is bandwidth-bound.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, N, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(H + row * stride_h + cols, x.to(H.dtype.element_ty), mask=mask)
        ms = tl.sum(x * x, axis=0) / N
        rstd = 1.0 / tl.sqrt(ms + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    h = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(h, weight, eps), h


def _launch(x, residual, weight, eps):
    check_dtype(x, "rms_norm")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    if x2.shape[0]:
        block = next_pow2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), y, h, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )
    return y.reshape(x.shape), h.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of `x`."""
    if not use_triton(x, weight):
        check_dtype(x, "rms_norm")
        return rms_norm_reference(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual) in one pass."""
    if not use_triton(x, residual, weight):
        check_dtype(x, "add_rms_norm")
        return add_rms_norm_reference(x, residual, weight, eps)
    return _launch(x, residual, weight, eps)

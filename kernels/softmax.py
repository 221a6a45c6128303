"""Row softmax over the last dimension, with an optional scale (logits / temperature for sampling).

Math: y_j = exp(s*x_j - max_k s*x_k) / sum_k exp(s*x_k - max_k s*x_k), in fp32.

Memory traffic: read M*N, write M*N. Rows up to 16384 wide are held in registers by one program (one HBM read);
wider rows (a 49k vocabulary) take the looped two-pass kernel: an online max/sum pass, then a normalize pass,
so they read the row twice (the second read mostly hits L2).
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton

_ONE_PASS_MAX = 16384
_LOOP_BLOCK = 4096

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_kernel(X, Y, stride_x, stride_y, N, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        e = tl.where(mask, e, 0.0)
        tl.store(Y + row * stride_y + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_looped_kernel(X, Y, stride_x, stride_y, N, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), -float("inf"), tl.float32)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(X + row * stride_x + start + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, x)
            # lanes still at -inf on both sides would give nan; keep them at 0
            alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp(m - m_new))
            acc = acc * alpha + tl.where(mask, tl.exp(x - m_new), 0.0)
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(tl.where(m == -float("inf"), 0.0, acc * tl.exp(m - row_max)), axis=0)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(X + row * stride_x + start + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
            y = tl.exp(x - row_max) / total
            tl.store(Y + row * stride_y + start + cols, y.to(Y.dtype.element_ty), mask=mask)


def softmax_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    xf = x.float()
    return torch.softmax(xf if scale == 1.0 else xf * scale, dim=-1).to(x.dtype)  # x * 1.0 is exact: skip the pass


def softmax(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """softmax(scale * x) over the last dimension."""
    check_dtype(x, "softmax")
    if not use_triton(x):
        return softmax_reference(x, scale)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        if n <= _ONE_PASS_MAX:
            block = next_pow2(n)
            _softmax_kernel[(rows,)](
                x2, y, x2.stride(0), y.stride(0), n, float(scale), BLOCK=block,
                num_warps=min(max(block // 256, 1), 16),
            )
        else:
            _softmax_looped_kernel[(rows,)](
                x2, y, x2.stride(0), y.stride(0), n, float(scale), BLOCK=_LOOP_BLOCK, num_warps=8
            )
    return y.reshape(x.shape)

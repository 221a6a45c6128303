"""Rotary position embedding (RoPE), "rotate-half" layout as in Llama/HF.

Math, for each head vector x of size D split into halves x1 = x[:D/2], x2 = x[D/2:], at position p with
inverse frequencies f_i = base^(-2i/D):  c = cos(p f_i), s = sin(p f_i);
    y1 = x1 * c - x2 * s;   y2 = x2 * c + x1 * s.
The cos/sin tables ([max_positions, D/2], fp32) are built once by `rope_tables`; `positions` [B, S] picks rows,
so prefill (0..S-1) and decode (one position per sequence) share the kernel.

Memory traffic: read and write B*S*H*D elements plus B*S*D (cos, sin in fp32); bandwidth-bound.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, check_dtype, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(
        X, Y, COS, SIN, POS, S, H,
        sx_b, sx_s, sx_h, sy_b, sy_s, sy_h, sp_b, sp_s, stride_cs,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        tok = tl.program_id(0)
        b = (tok // S).to(tl.int64)
        s = (tok % S).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        mask = (heads[:, None] < H) & dmask[None, :]
        pos = tl.load(POS + b * sp_b + s * sp_s).to(tl.int64)
        c = tl.load(COS + pos * stride_cs + d, mask=dmask, other=0.0)[None, :]
        sn = tl.load(SIN + pos * stride_cs + d, mask=dmask, other=0.0)[None, :]
        xp = X + b * sx_b + s * sx_s + heads[:, None] * sx_h + d[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        yp = Y + b * sy_b + s * sy_s + heads[:, None] * sy_h + d[None, :]
        tl.store(yp, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=mask)


def rope_tables(head_dim: int, max_positions: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_positions, head_dim // 2] in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c = cos[positions][:, :, None, :]  # [B, S, 1, D/2]
    s = sin[positions][:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, S, H, D] (last dim contiguous) by the angles at `positions` [B, S]."""
    check_dtype(x, "rotary")
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    bsz, seq, heads, dim = x.shape
    if dim % 2 or cos.shape[-1] != dim // 2 or sin.shape != cos.shape:
        raise ValueError(f"rotary: tables must be [positions, {dim // 2}] for head_dim {dim}, got {tuple(cos.shape)}")
    if positions.shape != (bsz, seq):
        raise ValueError(f"rotary: positions must be [{bsz}, {seq}], got {tuple(positions.shape)}")
    if not use_triton(x, cos, sin, positions):
        return rotary_reference(x, cos, sin, positions)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    if x.numel():
        half = dim // 2
        block_h = min(16, triton.next_power_of_2(heads))
        cos, sin = cos.contiguous(), sin.contiguous()
        _rotary_kernel[(bsz * seq, triton.cdiv(heads, block_h))](
            x, y, cos, sin, positions, seq, heads,
            x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            positions.stride(0), positions.stride(1), cos.stride(0),
            HALF=half, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )
    return y

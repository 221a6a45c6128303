"""y = x @ W^T with W block-quantized (`kernels.quant`: Q8_0, or Q4_0/Q4_1 as "q4"), dequantized inside the kernel.

Math, per output n and block b of 32 inputs (codes q, scale d, min m; m = 0 for Q8_0):
    y[i, n] = sum_b ( d[n, b] * sum_j x[i, 32b + j] * q[n, 32b + j]  +  m[n, b] * sum_j x[i, 32b + j] )
so the inner products run on the small integer codes (exact in fp16/bf16/fp32) and the scales are applied once
per block in fp32; the weights are never materialized in floating point.

Two Triton kernels, picked by the number of rows M:
- GEMV (decode, M <= 4): one program per (BLOCK_N outputs, row), BLOCK_B blocks per step, products reduced with
  `tl.sum` (a batch-1 step is bound by reading the weights: 0.56 bytes per weight for Q4_1, 1.06 for Q8_0,
  against 2 for fp16).
- GEMM (prefill, batched decode): BLOCK_M x BLOCK_N tiles, each block of 32 as two K=16 `tl.dot`s (low and high
  nibbles, which GGUF stores as the two halves of the block), fp32 accumulators.
Untested on a real GPU so far (written for Triton 3.x; checked under TRITON_INTERPRET=1 on CPU).

On CPU (no interpreter) the weight runs through our C kernel over the same blocks (`kernels.cpu_gemm`: int8 dot
products, fp32 out) where it builds (AVX2 and a C compiler), else through torch's own weight-only int4 GEMM
(`aten._weight_int4pack_mm_for_cpu`, groups of 32, per-group scale and zero point), see `CpuInt4Linear`.
"""

from __future__ import annotations

import torch

from . import cpu_gemm
from ._dispatch import HAS_TRITON, INTERPRET, check_dtype, use_triton
from .quant import BLOCK, QuantWeight, codes, dequantize

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _qgemv_kernel(
        X, QS, D, MN, Y, N, NB, sxm, sym,
        Q4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        rows_n = offs_n.to(tl.int64)
        offs_b = tl.arange(0, BLOCK_B)
        offs_h = tl.arange(0, 16)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for b0 in range(0, NB, BLOCK_B):
            blk = b0 + offs_b
            bmask = blk < NB
            xo = X + row * sxm + blk[:, None] * 32 + offs_h[None, :]
            x_lo = tl.load(xo, mask=bmask[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(xo + 16, mask=bmask[:, None], other=0.0).to(tl.float32)
            wmask = nmask[:, None, None] & bmask[None, :, None]
            if Q4:
                byt = tl.load(QS + rows_n[:, None, None] * (NB * 16) + blk[None, :, None] * 16
                              + offs_h[None, None, :], mask=wmask, other=0)
                q_lo = (byt & 15).to(tl.float32)
                q_hi = (byt >> 4).to(tl.float32)
            else:
                base = QS + rows_n[:, None, None] * (NB * 32) + blk[None, :, None] * 32 + offs_h[None, None, :]
                q_lo = tl.load(base, mask=wmask, other=0).to(tl.float32)
                q_hi = tl.load(base + 16, mask=wmask, other=0).to(tl.float32)
            part = tl.sum(q_lo * x_lo[None, :, :], axis=2) + tl.sum(q_hi * x_hi[None, :, :], axis=2)
            smask = nmask[:, None] & bmask[None, :]
            sidx = rows_n[:, None] * NB + blk[None, :]
            contrib = part * tl.load(D + sidx, mask=smask, other=0.0).to(tl.float32)
            if Q4:
                xsum = tl.sum(x_lo, axis=1) + tl.sum(x_hi, axis=1)
                contrib += tl.load(MN + sidx, mask=smask, other=0.0).to(tl.float32) * xsum[None, :]
            acc += tl.sum(contrib, axis=1)
        tl.store(Y + row * sym + offs_n, acc.to(Y.dtype.element_ty), mask=nmask)

    @triton.jit
    def _qgemm_kernel(
        X, QS, D, MN, Y, M, N, NB, sxm, sym,
        Q4: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = offs_m < M
        nmask = offs_n < N
        rows_n = offs_n.to(tl.int64)
        offs_h = tl.arange(0, 16)
        x_rows = X + offs_m.to(tl.int64)[:, None] * sxm + offs_h[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for b in range(0, NB):
            x_lo = tl.load(x_rows + b * 32, mask=mmask[:, None], other=0.0)
            x_hi = tl.load(x_rows + b * 32 + 16, mask=mmask[:, None], other=0.0)
            if Q4:
                byt = tl.load(QS + rows_n[None, :] * (NB * 16) + b * 16 + offs_h[:, None], mask=nmask[None, :],
                              other=0)
                q_lo = (byt & 15).to(x_lo.dtype)
                q_hi = (byt >> 4).to(x_lo.dtype)
            else:
                base = QS + rows_n[None, :] * (NB * 32) + b * 32 + offs_h[:, None]
                q_lo = tl.load(base, mask=nmask[None, :], other=0).to(x_lo.dtype)
                q_hi = tl.load(base + 16, mask=nmask[None, :], other=0).to(x_lo.dtype)
            part = tl.dot(x_lo, q_lo, input_precision=PRECISION) + tl.dot(x_hi, q_hi, input_precision=PRECISION)
            d = tl.load(D + rows_n * NB + b, mask=nmask, other=0.0).to(tl.float32)
            acc += part * d[None, :]
            if Q4:
                xsum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
                mn = tl.load(MN + rows_n * NB + b, mask=nmask, other=0.0).to(tl.float32)
                acc += xsum[:, None] * mn[None, :]
        tl.store(Y + offs_m.to(tl.int64)[:, None] * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


GEMV_MAX_ROWS = 4


def _check(x: torch.Tensor, w: QuantWeight) -> None:
    check_dtype(x, "quant_linear")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"quant_linear: x has {x.shape[-1]} features but the weight is {w.shape} ([out, in])")


def quant_linear_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(w)^T in fp32, returned in x's dtype."""
    _check(x, w)
    return (x.float() @ dequantize(w).t()).to(x.dtype)


def quant_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with W dequantized inside the Triton kernel (fp32 accumulate); the torch
    reference where Triton does not run."""
    _check(x, w)
    if not use_triton(x, w.qs):
        return quant_linear_reference(x, w)
    n, k = w.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if rows == 0:
        return y.view(*x.shape[:-1], n)
    nb = k // BLOCK
    q4 = w.fmt == "q4"
    mn = w.m if w.m is not None else w.d
    if rows <= GEMV_MAX_ROWS:
        block_n = 16 if n < 4096 else 64
        _qgemv_kernel[(triton.cdiv(n, block_n), rows)](
            x2, w.qs, w.d, mn, y, n, nb, x2.stride(0), y.stride(0),
            Q4=q4, BLOCK_N=block_n, BLOCK_B=8, num_warps=4,
        )
    else:
        block_m = 16 if rows <= 16 else 32 if rows <= 64 else 64
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _qgemm_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, 64))](
            x2, w.qs, w.d, mn, y, rows, n, nb, x2.stride(0), y.stride(0),
            Q4=q4, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=64, num_warps=4,
        )
    return y.view(*x.shape[:-1], n)


class CpuInt4Linear:
    """A block-quantized weight in torch's CPU int4 layout, run by `aten._weight_int4pack_mm_for_cpu`.

    That op computes with groups of 32 inputs, w = (c - 8) * scale + zero for 4-bit codes c, so:
    - Q4_1 / Q4_0 map exactly: c = q, scale = d, zero = m + 8 d.
    - Q8_0 (8-bit codes) is split into two 4-bit halves, q = 16 hi + lo with hi in [-8, 7] and lo in [0, 15]:
      the packed weight is [hi | lo] along K (2K inputs), scales (16 d, 0) then (d, 8 d), and x is fed twice,
      [x | x]. Every code survives; the sum is d * q.
    Precision lost against the GGUF values (the op's fast path needs bf16 activations; measured 4-5x slower
    with fp32 ones on this AVX2 CPU): x is rounded to bf16 on the way in, the scale and zero to bf16 (2^-9
    relative, vs. the file's fp16), the output to bf16; accumulation inside is fp32. `dtype=torch.float32` runs
    the op's exact (slow) path, which is how the tests show the packing itself loses nothing.
    """

    def __init__(self, w: QuantWeight, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        n, k = w.shape
        q = codes(w).to(torch.int32)
        d = w.d.float()
        if w.fmt == "q4":
            assert w.m is not None
            self.split = False
            c, scale, zero = q, d, w.m.float() + 8 * d
        else:
            self.split = True
            c = torch.cat([(q >> 4) + 8, q & 15], dim=1)
            scale = torch.cat([16 * d, d], dim=1)
            zero = torch.cat([torch.zeros_like(d), 8 * d], dim=1)
        self.shape = (n, k)
        pad = -n % 16  # the packing takes N in multiples of 16: zero rows, sliced off the output
        if pad:
            c, scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (c, scale, zero))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2)
        self.scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_zeros))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"quant_linear: x has {x.shape[-1]} features but the weight is {self.shape}")
        x2 = x.reshape(-1, k).to(self.dtype)
        if self.split:
            x2 = torch.cat([x2, x2], dim=1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, BLOCK, self.scale_zeros)
        return y[:, :n].to(x.dtype).view(*x.shape[:-1], n)


class QuantizedLinear:
    """A model's block-quantized linear layer on its device: the blocks for the Triton kernels on a GPU; on CPU
    the C block GEMM (`cpu_gemm.BlockLinear`, fp32 out) where it builds, else torch's packed int4 form (both on
    CPU under the Triton interpreter, so tests can take either path). `native` says which CPU path it took."""

    def __init__(self, w: QuantWeight, device: torch.device) -> None:
        on_cpu = device.type == "cpu"
        self.shape = w.shape
        self.fmt = w.fmt
        self.native = on_cpu and cpu_gemm.available()[0]
        self.cpu: cpu_gemm.BlockLinear | CpuInt4Linear | None = None
        if on_cpu:
            self.cpu = cpu_gemm.BlockLinear(w) if self.native else CpuInt4Linear(w)
        self.blocks = w.to(device) if not on_cpu or (HAS_TRITON and INTERPRET) else None

    @property
    def nbytes(self) -> int:
        return (self.cpu.nbytes if self.cpu is not None else 0) + (
            self.blocks.nbytes if self.blocks is not None and self.cpu is None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and (self.cpu is None or use_triton(x)):
            return quant_linear(x, self.blocks)
        assert self.cpu is not None
        return self.cpu(x)

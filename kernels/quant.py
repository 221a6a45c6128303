"""GGUF block-quantized weights (llama.cpp's Q8_0, Q4_0, Q4_1) as typed tensors, and their torch reference math.

Every format cuts each row of a weight W [N, K] (out, in) into blocks of 32 consecutive inputs, one scale per
block, stored as fp16 (ggml's `block_q8_0` / `block_q4_0` / `block_q4_1`):
    Q8_0: w = d * q,        q int8 in [-127, 127]          (34 bytes / 32 weights, 8.5 bits each)
    Q4_0: w = d * (q - 8),  q in [0, 15]                   (18 bytes, 4.5 bits)
    Q4_1: w = d * q + m,    q in [0, 15], m fp16 (the min) (20 bytes, 5 bits)
In a 4-bit block byte j holds element j in its low nibble and element j + 16 in its high nibble.

`QuantWeight` keeps the blocks split into planes that kernels load directly (repacked once at load):
    "q8_0": qs int8  [N, K]       d fp16 [N, K/32]
    "q4":   qs uint8 [N, K/2]     d, m fp16 [N, K/32]   (GGUF's nibble order inside each 16-byte block)
Q4_0 is stored as "q4" with m = -8 d, which fp16 holds exactly (a power-of-two multiple), so one 4-bit kernel
serves both. `dequantize` is the reference: it reproduces the `gguf` package's fp32 values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
FORMATS = ("q8_0", "q4")
_GGUF_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass(frozen=True)
class QuantWeight:
    """One block-quantized weight [N, K]; see the module docstring for the planes of each format."""

    fmt: str
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown quantized format {self.fmt!r}; use one of {', '.join(FORMATS)}")
        n, nb = self.d.shape
        want = (n, nb * (BLOCK if self.fmt == "q8_0" else BLOCK // 2))
        if tuple(self.qs.shape) != want or (self.fmt == "q4") != (self.m is not None):
            raise ValueError(f"{self.fmt}: qs {tuple(self.qs.shape)} does not match scales {tuple(self.d.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes())

    def planes(self) -> list[torch.Tensor]:
        return [self.qs, self.d] + ([self.m] if self.m is not None else [])

    def to(self, device: torch.device | str) -> QuantWeight:
        return QuantWeight(self.fmt, self.qs.to(device), self.d.to(device),
                           None if self.m is None else self.m.to(device))

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The rows `index` (a permutation or a gather), still quantized: blocks run along K, so rows move whole."""
        return QuantWeight(self.fmt, self.qs[index], self.d[index], None if self.m is None else self.m[index])

    def named(self, prefix: str) -> dict[str, torch.Tensor]:
        """Plain tensors for a safetensors file: `prefix.qs`, `prefix.d` (and `prefix.m`)."""
        out = {f"{prefix}.qs": self.qs, f"{prefix}.d": self.d}
        if self.m is not None:
            out[f"{prefix}.m"] = self.m
        return out

    @classmethod
    def from_named(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantWeight:
        m = tensors.get(f"{prefix}.m")
        return cls("q8_0" if m is None else "q4", tensors[f"{prefix}.qs"], tensors[f"{prefix}.d"], m)


def cat_rows(weights: list[QuantWeight]) -> QuantWeight:
    """Stack weights of one format along N (fused projections)."""
    fmts = {w.fmt for w in weights}
    if len(fmts) != 1:
        raise ValueError(f"cannot fuse weights of different formats {sorted(fmts)}; requantize them to one")
    ms = [w.m for w in weights if w.m is not None]
    return QuantWeight(weights[0].fmt, torch.cat([w.qs for w in weights]), torch.cat([w.d for w in weights]),
                       torch.cat(ms) if ms else None)


def from_gguf(type_name: str, data: np.ndarray) -> QuantWeight:
    """Repack a GGUF tensor's raw blocks (`GGUFReader` tensor `.data`, uint8 [N, K/32 * bytes per block])."""
    size = _GGUF_BYTES.get(type_name)
    if size is None:
        raise ValueError(f"GGUF type {type_name} is not block-quantized here; supported: {', '.join(_GGUF_BYTES)}")
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{type_name}: raw data shape {raw.shape} is not [rows, blocks * {size}]")
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    if type_name == "Q8_0":
        qs = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1))
        return QuantWeight("q8_0", qs, d)
    if type_name == "Q4_0":
        return QuantWeight("q4", torch.from_numpy(blocks[..., 2:].reshape(raw.shape[0], -1).copy()), d, d * -8)
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    return QuantWeight("q4", torch.from_numpy(blocks[..., 4:].reshape(raw.shape[0], -1).copy()), d, m)


def unpack_q4(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> integer codes [N, K] in [0, 15], in element order."""
    b = qs.view(qs.shape[0], -1, BLOCK // 2)
    return torch.cat([b & 15, b >> 4], dim=-1).view(qs.shape[0], -1)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in [0, 15] -> uint8 [N, K/2] (inverse of `unpack_q4`)."""
    b = q.to(torch.uint8).view(q.shape[0], -1, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(q.shape[0], -1)


def codes(w: QuantWeight) -> torch.Tensor:
    """The integer codes [N, K] (int8 for q8_0, uint8 0..15 for q4)."""
    return w.qs if w.fmt == "q8_0" else unpack_q4(w.qs)


def dequantize(w: QuantWeight) -> torch.Tensor:
    """fp32 [N, K]: d * q (+ m), with d and m widened from fp16, as the `gguf` package computes them."""
    n, k = w.shape
    q = codes(w).view(n, -1, BLOCK).float()
    out = w.d.float()[..., None] * q
    if w.m is not None:
        out = out + w.m.float()[..., None]
    return out.view(n, k)


def quantize(weight: torch.Tensor, fmt: str) -> QuantWeight:
    """Block-quantize a float weight [N, K] (K a multiple of 32) to "q8_0", "q4_0" or "q4_1".

    The scale is rounded to fp16 first and the codes are chosen against the rounded scale, so each weight's error
    is at most half a step of the stored scale: Q8_0 d = absmax / 127; Q4_0 d = -(signed absmax) / 8 (ggml's
    rule, the largest magnitude lands on code 0); Q4_1 d = (max - min) / 15, m = min."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"quantize: need a 2-D weight with K a multiple of {BLOCK}, got {tuple(weight.shape)}")
    n = weight.shape[0]
    g = weight.detach().float().reshape(n, -1, BLOCK)

    def inv(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)

    if fmt == "q8_0":
        d = (g.abs().amax(-1) / 127).half()
        q = torch.round(g * inv(d.float())[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantWeight("q8_0", q.view(n, -1), d)
    if fmt == "q4_0":
        idx = g.abs().argmax(-1, keepdim=True)
        d = (torch.gather(g, -1, idx)[..., 0] / -8).half()
        q = torch.round(g * inv(d.float())[..., None] + 8).clamp(0, 15)
        return QuantWeight("q4", pack_q4(q.view(n, -1)), d, d * -8)
    if fmt == "q4_1":
        lo, hi = g.amin(-1), g.amax(-1)
        d, m = ((hi - lo) / 15).half(), lo.half()
        q = torch.round((g - m.float()[..., None]) * inv(d.float())[..., None]).clamp(0, 15)
        return QuantWeight("q4", pack_q4(q.view(n, -1)), d, m)
    raise ValueError(f"unknown quantization {fmt!r}; use q8_0, q4_0 or q4_1")


def embedding(ids: torch.Tensor, w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a quantized embedding table, dequantized: [*ids.shape, K] in `dtype`."""
    flat = ids.reshape(-1)
    return dequantize(w.rows(flat)).to(dtype).view(*ids.shape, w.shape[1])

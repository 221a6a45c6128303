"""Decode attention over a paged KV cache: one new query token per sequence, keys and values in fixed-size blocks.

Math, per sequence b and query head h (KV head h // G), with T = lengths[b]:
    K_b[t] = k_pool[block_tables[b, t // BS], t % BS, h // G]      (the same for V)
    o = softmax(q K_b[:T]^T * scale) V_b[:T]
A serving engine keeps every sequence's cache in a shared pool of blocks (`cocoon_faas.llm`), so a sequence grows
one block at a time with no reallocation, and sequences that share a prefix point at the same blocks.

The kernel gives each (sequence, KV head) program the G query heads that share the KV head and walks the
sequence's block table, one block (BS keys) per iteration, with the online softmax; each K/V element is read once
per group, not once per query head. Memory traffic: 2 * sum_b(T_b) * Hkv * D cache elements plus the block tables.

Layout: q [B, Hq, D]; k_pool, v_pool [num_blocks, BS, Hkv, D] (last dim contiguous); block_tables [B, max_blocks]
int32 (entries past a sequence's length are ignored); lengths [B] >= 1. Output [B, Hq, D]. BS must be a power of
two >= 16 on the Triton path (tl.dot tiles).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton
from .attention_decode import attention_decode_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, TABLES, LENS, Out, qk_scale,
        sq_b, sq_h, sk_n, sk_s, sk_h, sv_n, sv_s, sv_h, st_b, so_b, so_h,
        HKV, GROUP, D,
        PRECISION: tl.constexpr, BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // HKV).to(tl.int64)
        hk = (pid % HKV).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BS)
        gmask = offs_g < GROUP
        dmask = offs_d < D
        heads = hk * GROUP + offs_g
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=gmask[:, None] & dmask[None, :],
                    other=0.0)
        length = tl.load(LENS + b).to(tl.int32)
        m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        for n0 in range(0, length, BS):
            blk = tl.load(TABLES + b * st_b + n0 // BS).to(tl.int64)
            cols = n0 + offs_s
            kmask = cols < length
            k = tl.load(K + blk * sk_n + offs_s[None, :] * sk_s + hk * sk_h + offs_d[:, None],
                        mask=kmask[None, :] & dmask[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            s = tl.where(kmask[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + blk * sv_n + offs_s[:, None] * sv_s + hk * sv_h + offs_d[None, :],
                        mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(Out + b * so_b + heads[:, None] * so_h + offs_d[None, :], o.to(Out.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
           lengths: torch.Tensor) -> int:
    check_dtype(q, "paged_attention_decode")
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            "paged_attention_decode: q must be [B, Hq, D] and the pools [num_blocks, block_size, Hkv, D]; got "
            f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    bsz, hq, dim = q.shape
    if k_pool.shape[3] != dim or hq % k_pool.shape[2]:
        raise ValueError("paged_attention_decode: head_dim must agree and Hq be a multiple of Hkv")
    if block_tables.dim() != 2 or block_tables.shape[0] != bsz or lengths.shape != (bsz,):
        raise ValueError(f"paged_attention_decode: block_tables must be [{bsz}, max_blocks] and lengths [{bsz}]; "
                         f"got {tuple(block_tables.shape)}, {tuple(lengths.shape)}")
    return hq // k_pool.shape[2]


def gather_blocks(pool: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of each sequence, [B, Hkv, length, D] (a view when it can be)."""
    bs = pool.shape[1]
    nblk = -(-length // bs)
    g = pool[block_tables[:, :nblk].long()]  # [B, nblk, BS, Hkv, D]
    return g.flatten(1, 2)[:, :length].transpose(1, 2)


def paged_attention_decode_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    lengths: torch.Tensor, *, scale: float | None = None, max_len: int | None = None,
) -> torch.Tensor:
    """Gather each sequence's blocks into a contiguous cache, then the dense decode reference (one place for the
    masked SDPA both ops are checked against)."""
    _check(q, k_pool, v_pool, block_tables, lengths)
    t = int(lengths.max()) if max_len is None else max_len
    k, v = gather_blocks(k_pool, block_tables, t), gather_blocks(v_pool, block_tables, t)
    return attention_decode_reference(q, k, v, lengths, scale=scale, max_len=t)


def paged_attention_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    lengths: torch.Tensor, *, scale: float | None = None, max_len: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its first lengths[b] cached positions, found through its
    block table. `max_len` (a host int >= every length) spares the reference path a read of `lengths`."""
    group = _check(q, k_pool, v_pool, block_tables, lengths)
    if not use_triton(q, k_pool, v_pool, block_tables, lengths):
        return paged_attention_decode_reference(q, k_pool, v_pool, block_tables, lengths, scale=scale,
                                                max_len=max_len)
    bsz, hq, dim = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"paged_attention_decode: block size {bs} must be a power of two >= 16")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("paged_attention_decode: the pools need a contiguous last dimension")
    q = q if q.stride(-1) == 1 else q.contiguous()
    tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()
    lens = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty((bsz, hq, dim), dtype=q.dtype, device=q.device)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    _paged_decode_kernel[(bsz * hkv,)](
        q, k_pool, v_pool, tables, lens, out, sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        hkv, group, dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BS=bs,
        BLOCK_G=max(16, next_pow2(group)), BLOCK_D=max(16, next_pow2(dim)), num_warps=4,
    )
    return out

"""Attention for one new token per sequence over a KV cache (the decode step), split-K ("flash-decoding").

Math, per batch b and query head h (KV head h // G): o = softmax(q K[:len_b]^T * scale) V[:len_b].

Kernel 1 gives each (b, KV head, split) program the G query heads that share the KV head and one SPLIT-long slice
of the cache: it streams K/V in BLOCK_N tiles with the online softmax and writes a partial output (normalized
by its own sum) and its log-sum-exp. Kernel 2 merges the splits: o = sum_s w_s o_s / sum_s w_s, with
w_s = 2^(lse_s - max lse). Splitting the sequence gives a GPU enough programs at batch 1; grouping query heads
reads each K/V element once per group instead of once per query head.

Memory traffic: read 2 * B * Hkv * len * D cache elements once (the op is bound by it), plus small partials.

Layout: q [B, Hq, D]; k_cache, v_cache [B, Hkv, T, D] (any strides, last dim contiguous); lengths [B] = valid
positions (including the token just written). Output [B, Hq, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton

_SPLIT = 512
_BLOCK_N = 64

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_decode_split_kernel(
        Q, K, V, LENS, MID_O, MID_LSE, qk_scale,
        sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, smo_b, smo_h, smo_s, sml_b, sml_h,
        HKV, GROUP, D, SPLIT,
        PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid // HKV).to(tl.int64)
        hk = (pid % HKV).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        gmask = offs_g < GROUP
        dmask = offs_d < D
        heads = hk * GROUP + offs_g
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        length = tl.load(LENS + b).to(tl.int32)
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, length)
        m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + offs_n
            kmask = cols < end
            k = tl.load(k_base + cols[None, :] * sk_s + offs_d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            s = tl.where(kmask[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, -float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(
            MID_O + b * smo_b + heads[:, None] * smo_h + split * smo_s + offs_d[None, :], o,
            mask=gmask[:, None] & dmask[None, :],
        )
        tl.store(MID_LSE + b * sml_b + heads * sml_h + split, lse, mask=gmask)

    @triton.jit
    def _attn_decode_merge_kernel(
        MID_O, MID_LSE, Out, smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h, H, NSPLIT, D,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        smask = offs_s < NSPLIT
        dmask = offs_d < D
        lse = tl.load(MID_LSE + b * sml_b + h * sml_h + offs_s, mask=smask, other=-float("inf"))
        mx = tl.max(lse, axis=0)
        w = tl.where(lse == -float("inf"), 0.0, tl.math.exp2(lse - mx))
        o = tl.load(
            MID_O + b * smo_b + h * smo_h + offs_s[:, None] * smo_s + offs_d[None, :],
            mask=smask[:, None] & dmask[None, :], other=0.0,
        )
        out = tl.sum(o * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
        tl.store(Out + b * so_b + h * so_h + offs_d, out.to(Out.dtype.element_ty), mask=dmask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> int:
    check_dtype(q, "attention_decode")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"attention_decode: q must be [B, Hq, D] and caches [B, Hkv, T, D]; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    bsz, hq, dim = q.shape
    if k_cache.shape[0] != bsz or k_cache.shape[3] != dim or hq % k_cache.shape[1]:
        raise ValueError("attention_decode: batch and head_dim must agree and Hq be a multiple of Hkv")
    if lengths.shape != (bsz,):
        raise ValueError(f"attention_decode: lengths must be [{bsz}], got {tuple(lengths.shape)}")
    return hq // k_cache.shape[1]


def attention_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    *, scale: float | None = None, max_len: int | None = None,
) -> torch.Tensor:
    group = _check(q, k_cache, v_cache, lengths)
    t = k_cache.shape[2] if max_len is None else min(max_len, k_cache.shape[2])
    k, v = k_cache[:, :, :t], v_cache[:, :, :t]
    mask = None
    # Host lengths covering all t positions (every decode step at batch 1) need no mask: reading them back is
    # free on CPU, and SDPA's unmasked path skips building an additive mask per call.
    if lengths.device.type != "cpu" or (lengths.numel() > 0 and int(lengths.min()) < t):
        mask = (torch.arange(t, device=q.device)[None, :] < lengths.to(q.device)[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    return out[:, :, 0, :]


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    *, scale: float | None = None, max_len: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over the first lengths[b] cache positions. `max_len` (a host
    int >= every length) bounds the work without reading `lengths` back from the device."""
    group = _check(q, k_cache, v_cache, lengths)
    if not use_triton(q, k_cache, v_cache, lengths):
        return attention_decode_reference(q, k_cache, v_cache, lengths, scale=scale, max_len=max_len)
    bsz, hq, dim = q.shape
    hkv = k_cache.shape[1]
    t = k_cache.shape[2] if max_len is None else min(max_len, k_cache.shape[2])
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention_decode: caches need a contiguous last dimension")
    nsplit = max(1, triton.cdiv(t, _SPLIT))
    mid_o = torch.empty((bsz, hq, nsplit, dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bsz, hq, nsplit), dtype=torch.float32, device=q.device)
    out = torch.empty((bsz, hq, dim), dtype=q.dtype, device=q.device)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    lens = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    block_d = max(16, next_pow2(dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _attn_decode_split_kernel[(bsz * hkv, nsplit)](
        q, k_cache, v_cache, lens, mid_o, mid_lse, sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        hkv, group, dim, _SPLIT,
        PRECISION=precision, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=4,
    )
    _attn_decode_merge_kernel[(bsz * hq,)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), out.stride(0), out.stride(1), hq, nsplit, dim,
        BLOCK_S=next_pow2(nsplit), BLOCK_D=block_d, num_warps=1,
    )
    return out

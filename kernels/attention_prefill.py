"""Flash-style attention for a whole prompt: causal or padded-bidirectional, grouped KV heads.

Math, per batch b and query head h (KV head h // (Hq / Hkv)):
    S = Q K^T * scale;  S[i, j] = -inf where j >= len_b (key padding) or, if causal, j > i + (Sk - Sq);
    O = softmax(S) V.
The kernel never materializes S: each program owns BLOCK_M query rows and streams K/V in BLOCK_N tiles with the
online softmax (running max m, running sum l, rescaled accumulator), in base 2 (exp2, scale folded with log2 e).
Causal programs stop at their diagonal; padded programs stop at len_b.

Memory traffic: read Q and write O once, read K/V once per query tile ((Sq / BLOCK_M) times), no Sq x Sk buffer.
FLOPs: 4 * B * Hq * Sq * Sk * D (halved when causal); compute-bound for long prompts.

Layout: q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D], any strides with a contiguous last dimension (so views of
[B, S, H, D] projections work without copies). The output is [B, Hq, Sq, D] stored as [B, Sq, Hq, D] memory, so
`out.transpose(1, 2).reshape(B, Sq, Hq * D)` is free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_dtype, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_prefill_kernel(
        Q, K, V, Out, LENS, qk_scale,
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
        H, GROUP, SQ, SK, D,
        CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
            mask=(offs_m < SQ)[:, None] & dmask[None, :], other=0.0,
        )
        kv_len = SK
        if HAS_LENS:
            kv_len = tl.minimum(tl.load(LENS + b).to(tl.int32), SK)
        end_n = kv_len
        if CAUSAL:
            end_n = tl.minimum(kv_len, (start_m + 1) * BLOCK_M + SK - SQ)
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            kmask = cols < kv_len
            k = tl.load(k_base + cols[None, :] * sk_s + offs_d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0)
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            valid = kmask[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + (SK - SQ))
            qk = tl.where(valid, qk, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
            acc.to(Out.dtype.element_ty), mask=(offs_m < SQ)[:, None] & dmask[None, :],
        )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    check_dtype(q, "attention")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention: q must be [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"attention: batch and head_dim must agree and Hq ({q.shape[1]}) be a multiple of Hkv ({k.shape[1]})"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return q.shape[1] // k.shape[1]


def key_mask(
    batch: int, sq: int, sk: int, lengths: torch.Tensor | None, causal: bool, device
) -> torch.Tensor | None:
    """Boolean mask (True = attend) for the reference path, broadcastable to [B, 1, Sq, Sk]: [B, 1, 1, Sk] for
    padding alone (SDPA then converts Sk values per sequence, not Sq * Sk), [B, 1, Sq, Sk] when causal; None when
    nothing is masked."""
    if lengths is None and not causal:
        return None
    cols = torch.arange(sk, device=device)
    if not causal:
        assert lengths is not None  # checked above: bidirectional without lengths needs no mask
        return (cols[None, :] < lengths.to(device)[:, None])[:, None, None, :]
    rows = torch.arange(sq, device=device)
    mask = (cols[None, :] <= rows[:, None] + (sk - sq))[None, None]
    if lengths is not None:
        mask = mask & (cols[None, None, None, :] < lengths.to(device)[:, None, None, None])
    return mask


def attention_prefill_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    lengths: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    group = _check(q, k, v)
    if causal and lengths is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    mask = key_mask(q.shape[0], q.shape[2], k.shape[2], lengths, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    lengths: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v. `lengths` [B]: valid keys per sequence (right padding); every
    sequence needs at least one valid key. `scale` defaults to 1/sqrt(D)."""
    group = _check(q, k, v)
    if not use_triton(q, k, v):
        return attention_prefill_reference(q, k, v, causal=causal, lengths=lengths, scale=scale)
    bsz, hq, sq, dim = q.shape
    sk = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((bsz, sq, hq, dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    lens = lengths.to(device=q.device, dtype=torch.int32).contiguous() if lengths is not None else q
    block_m = 64 if sq > 32 else 16
    block_n = 64
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(sq, block_m), bsz * hq)
    _attn_prefill_kernel[grid](
        q, k, v, out, lens, sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, group, sq, sk, dim,
        CAUSAL=causal, HAS_LENS=lengths is not None, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(dim)), num_warps=4, num_stages=2,
    )
    return out

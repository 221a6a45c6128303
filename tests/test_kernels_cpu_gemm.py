"""The C block GEMM (kernels/cpu_gemm.c) against its math on odd shapes, every format, 1 and 2 threads.

Reference: x rounded to int8 per block of 32 exactly as the kernel states (q = round-half-even(x * 127 / absmax),
d = absmax / 127), then the block sums of the module docstring in float64. The kernel must match that to fp32
rounding (it sums integers exactly), and the plain float product within the rounding of x it documents."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of cocoon_faas.kernels in this test session
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cocoon_faas.kernels import cpu_gemm  # noqa: E402
from cocoon_faas.kernels.quant import BLOCK, QuantWeight, codes, dequantize, quantize  # noqa: E402

ok, why = cpu_gemm.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"the C block GEMM does not build here: {why}")


def _rounded_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int codes [M, K] as float64, scales [M, K/32] as float64), the kernel's rounding of x (fp32 math)."""
    m, k = x.shape
    b = x.view(m, k // BLOCK, BLOCK)
    amax = b.abs().amax(-1)
    d = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv[..., None])
    return q.view(m, k).double(), d.double()


def _reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    q, dx = _rounded_x(x)
    n, k = w.shape
    m = x.shape[0]
    wq = codes(w).double().view(n, -1, BLOCK)
    qx = q.view(m, -1, BLOCK)
    dots = torch.einsum("nbj,mbj->mnb", wq, qx)
    y = (dots * w.d.double()[None] * dx[:, None]).sum(-1)
    if w.m is not None:
        y = y + (w.m.double()[None] * (dx * qx.sum(-1))[:, None]).sum(-1)
    return y


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_block_math_on_odd_shapes(fmt, threads):
    torch.manual_seed(3)
    cpu_gemm.set_threads(threads)
    try:
        for n, k in [(1, 32), (37, 64), (200, 96), (515, 160)]:
            w = quantize(torch.randn(n, k) * 0.1, fmt)
            lin = cpu_gemm.BlockLinear(w)
            for m in (1, 3, 4, 5, 9):
                x = torch.randn(m, k)
                x[0, :BLOCK] = 0  # an all-zero block: scale 0, no division by it
                y = lin(x)
                assert y.dtype == torch.float32 and y.shape == (m, n)
                ref = _reference(x, w)
                assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (n, k, m)
                exact = x.double() @ dequantize(w).double().t()
                # x's rounding: at most half a step (absmax / 254) per element, summed over k inputs
                bound = (x.abs().view(m, -1, BLOCK).amax(-1) / 254).repeat_interleave(BLOCK, 1).double() \
                    @ dequantize(w).double().abs().t()
                assert ((y.double() - exact).abs() <= bound + 1e-5).all()
    finally:
        cpu_gemm.set_threads(1)


def test_q8_0_extreme_codes_do_not_saturate():
    """-128 in a Q8_0 block (ggml writes [-127, 127], a file may hold -128) and x at full scale: every int16 pair
    of vpmaddubsw stays below 32767, so the integer sums are exact."""
    n, k = 16, 64
    qs = torch.full((n, k), -128, dtype=torch.int8)
    qs[:, 1::2] = 127
    w = QuantWeight("q8_0", qs, torch.full((n, k // BLOCK), 0.5, dtype=torch.float16))
    x = torch.full((3, k), -1.0)
    x[:, 1::2] = 1.0
    y = cpu_gemm.BlockLinear(w)(x)
    want = (k // 2) * (128 * 0.5 + 127 * 0.5)  # x is +-1, exact in int8 at scale 1/127: 4080
    assert torch.equal(y, torch.full((3, n), want))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_results_do_not_depend_on_the_batch(fmt, threads):
    """Each row's sums run in the same order whatever the other rows are: the engine's batched decode gives the
    same bits as a request alone. Q4 tiles pack two rows into one vector: a row gets the same bits alone, first
    or second of its pair, in a full tile of four or in the leftover rows, over an odd number of columns (37 rows:
    with 2 threads their int8 rounding is split between the threads too)."""
    torch.manual_seed(0)
    w = quantize(torch.randn(301, 160) * 0.05, fmt)
    lin = cpu_gemm.BlockLinear(w)
    x = torch.randn(37, 160)
    cpu_gemm.set_threads(threads)
    try:
        together = lin(x)
        for i in range(37):
            assert torch.equal(lin(x[i:i + 1])[0], together[i])
        for a, b in [(1, 6), (3, 13), (2, 11), (5, 8), (1, 36)]:
            assert torch.equal(lin(x[a:b]), together[a:b]), (a, b)
    finally:
        cpu_gemm.set_threads(1)


def test_inputs_are_checked():
    lin = cpu_gemm.BlockLinear(quantize(torch.randn(8, 64), "q8_0"))
    with pytest.raises(ValueError, match="features"):
        lin(torch.randn(2, 32))
    x = torch.randn(64, 3).t()  # non-contiguous rows, and fp64 below: converted, same answer
    assert torch.allclose(lin(x), lin(x.contiguous()))
    assert torch.allclose(lin(x.double()), lin(x.contiguous()))
    assert lin(torch.randn(0, 64)).shape == (0, 8)
    assert lin(torch.randn(2, 3, 64)).shape == (2, 3, 8)


def test_layer_tail_is_the_layer_math():
    """`LayerTail` (one C call) against the same layer written with torch ops on the kernel's own GEMMs."""
    torch.manual_seed(5)
    hidden, inter, heads_dim, eps = 64, 96, 64, 1e-5
    o, gu, dn = (cpu_gemm.BlockLinear(quantize(torch.randn(n, k) * 0.1, f))
                 for n, k, f in [(hidden, heads_dim, "q4_1"), (2 * inter, hidden, "q4_1"), (hidden, inter, "q8_0")])
    ln_ffn, ln_next = torch.rand(hidden) + 0.5, torch.rand(hidden) + 0.5
    tail = cpu_gemm.LayerTail(o, gu, dn, ln_ffn, ln_next, eps)

    def norm(x, w):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w

    cpu_gemm.set_threads(2)  # 40 rows: each GEMM's rows are quantized on both threads
    try:
        for rows in (1, 3, 6, 40):
            h, a = torch.randn(rows, hidden), torch.randn(rows, heads_dim)
            want_h = h + o(a)
            x = norm(want_h, ln_ffn)
            g = gu(x)
            want_h = want_h + dn(torch.nn.functional.silu(g[:, :inter]) * g[:, inter:])
            got_h = h.clone()
            out = tail(got_h, a)
            assert torch.allclose(got_h, want_h, rtol=1e-4, atol=1e-4)
            assert torch.allclose(out, norm(want_h, ln_next), rtol=1e-4, atol=1e-4)
    finally:
        cpu_gemm.set_threads(1)
    with pytest.raises(ValueError, match="do not chain"):
        cpu_gemm.LayerTail(o, dn, gu, ln_ffn, ln_next, eps)
    with pytest.raises(ValueError, match="fp32 contiguous"):
        tail(torch.randn(2, hidden).double(), torch.randn(2, heads_dim))


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa_on_each_row(threads):
    """Rows of different lengths over scattered cache slots, grouped heads, odd head dim: each row equals SDPA
    over exactly its own positions."""
    torch.manual_seed(11)
    cpu_gemm.set_threads(threads)
    try:
        for heads, kv_heads, dim in [(9, 3, 64), (4, 4, 12), (6, 2, 40)]:
            cache_rows = 97
            kc, vc = torch.randn(cache_rows, kv_heads, dim), torch.randn(cache_rows, kv_heads, dim)
            lengths = torch.tensor([1, 17, 40, 5])
            slots = torch.stack([torch.randperm(cache_rows)[:40] for _ in range(4)])
            q = torch.randn(4, heads + kv_heads, dim)[:, :heads]  # a view with a row stride, as the runner has
            got = cpu_gemm.DecodeAttention(slots, lengths, cache_rows)(q, kc, vc)
            for r in range(4):
                s = slots[r, :lengths[r]]
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[r][None, :, None], kc[s].transpose(0, 1)[None], vc[s].transpose(0, 1)[None], enable_gqa=True)
                assert torch.allclose(got[r], want.reshape(-1), atol=1e-5, rtol=1e-4), (heads, kv_heads, dim, r)
    finally:
        cpu_gemm.set_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_rows_share_tiles_and_equal_each_row_alone(threads):
    """A prefill chunk's rows (one slot list, lengths growing by one) are tiled together (up to 16 rows per tile,
    here 35 rows: two full tiles and 3 left over), beside decode rows of their own: each row equals SDPA over its
    own positions, and has the same bits alone, in a differently cut chunk, or without the tiling."""
    torch.manual_seed(12)
    cpu_gemm.set_threads(threads)
    try:
        for heads, kv_heads, dim in [(9, 3, 64), (6, 2, 40), (4, 4, 12)]:
            cache_rows, ctx, n = 120, 61, 35
            kc, vc = torch.randn(cache_rows, kv_heads, dim), torch.randn(cache_rows, kv_heads, dim)
            chunk = torch.randperm(cache_rows)[:ctx]
            other = torch.randperm(cache_rows)[:ctx]
            slots = torch.cat([other[None], chunk.repeat(n, 1), other[None]])  # decode, the chunk, decode
            lengths = torch.cat([torch.tensor([7]), torch.arange(ctx - n + 1, ctx + 1), torch.tensor([ctx])])
            q = torch.randn(n + 2, heads, dim)
            plan = cpu_gemm.DecodeAttention(slots, lengths, cache_rows)
            assert plan.shared.tolist() == [0, 0] + [1] * (n - 1) + [0]
            got = plan(q, kc, vc)
            for r in range(n + 2):
                s = slots[r, :lengths[r]]
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[r][None, :, None], kc[s].transpose(0, 1)[None], vc[s].transpose(0, 1)[None], enable_gqa=True)
                assert torch.allclose(got[r], want.reshape(-1), atol=1e-5, rtol=1e-4), (heads, dim, r)
                alone = cpu_gemm.DecodeAttention(slots[r:r + 1], lengths[r:r + 1], cache_rows)(q[r:r + 1], kc, vc)
                assert torch.equal(alone[0], got[r]), (heads, dim, r)
            cut = cpu_gemm.DecodeAttention(slots[4:27], lengths[4:27], cache_rows)(q[4:27], kc, vc)
            assert torch.equal(cut, got[4:27])
            untiled = cpu_gemm.DecodeAttention(slots, lengths, cache_rows)
            untiled.shared.zero_()
            assert torch.equal(untiled(q, kc, vc), got)
    finally:
        cpu_gemm.set_threads(1)


def test_back_to_back_calls_of_different_sizes_on_the_pool():
    """Calls whose work is split into different numbers of parts (a 40-row GEMM rounds its rows on both threads,
    then splits its columns; attention splits its tiles) follow each other on a 2-thread pool: each gives the
    same bits every time. (A worker that woke late for one call could claim a part of the next before it was
    published, run it with the wrong arguments and let the caller return early: engines segfaulted under load.)"""
    torch.manual_seed(4)
    lins = [cpu_gemm.BlockLinear(quantize(torch.randn(n, 64) * 0.1, "q4_1")) for n in (64, 320, 512)]
    xs = [torch.randn(m, 64) for m in (1, 5, 40)]
    kc, vc = torch.randn(64, 1, 8), torch.randn(64, 1, 8)
    plans = [cpu_gemm.DecodeAttention(torch.randperm(64)[:16].repeat(r, 1), torch.full((r,), 16), 64)
             for r in (1, 40)]
    qs = [torch.randn(r, 2, 8) for r in (1, 40)]
    cpu_gemm.set_threads(2)
    try:
        want = [[lin(x) for x in xs] for lin in lins], [p(q, kc, vc) for p, q in zip(plans, qs, strict=True)]
        for _ in range(300):
            for i, lin in enumerate(lins):
                for j, x in enumerate(xs):
                    assert torch.equal(lin(x), want[0][i][j])
                    assert torch.equal(plans[j % 2](qs[j % 2], kc, vc), want[1][j % 2])
    finally:
        cpu_gemm.set_threads(1)


def test_decode_attention_refuses_bad_plans():
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_gemm.DecodeAttention(torch.tensor([[0, 50]]), torch.tensor([2]), 50)
    with pytest.raises(ValueError, match="lengths"):
        cpu_gemm.DecodeAttention(torch.tensor([[0, 1]]), torch.tensor([3]), 50)
    plan = cpu_gemm.DecodeAttention(torch.tensor([[0, 1]]), torch.tensor([2]), 50)
    with pytest.raises(ValueError, match="k_cache"):
        plan(torch.randn(1, 2, 8), torch.randn(49, 1, 8), torch.randn(50, 1, 8))


def test_decode_layer_is_its_pieces_bit_for_bit():
    """`DecodeLayer` (one call) gives the same bits as QKV GEMM, `Rotary`, cache writes, `DecodeAttention` and
    `LayerTail` called one by one, which is what a step with a prefill in it runs: a decoding row's tokens do not
    depend on the kind of step it is in. Rotary is also checked against the textbook rotate-half formula."""
    torch.manual_seed(2)
    heads, kv_heads, dim, hidden, inter, rows, cache_rows = 4, 2, 16, 64, 64, 3, 40
    qkv = cpu_gemm.BlockLinear(quantize(torch.randn((heads + 2 * kv_heads) * dim, hidden) * 0.1, "q4_1"))
    tail = cpu_gemm.LayerTail(*(cpu_gemm.BlockLinear(quantize(torch.randn(n, k) * 0.1, "q8_0"))
                                for n, k in [(hidden, heads * dim), (2 * inter, hidden), (hidden, inter)]),
                              torch.rand(hidden) + 0.5, torch.rand(hidden) + 0.5, 1e-5)
    from cocoon_faas.kernels import rope_tables

    cos, sin = rope_tables(dim, 64)
    layer = cpu_gemm.DecodeLayer(qkv, tail, heads, kv_heads, dim)
    kc, vc = torch.randn(cache_rows, kv_heads, dim), torch.randn(cache_rows, kv_heads, dim)
    slots = torch.tensor([5, 17, 30])
    positions = torch.tensor([3, 9, 0])
    table = torch.stack([torch.randperm(cache_rows)[:12] for _ in range(rows)])
    table[torch.arange(rows), positions] = slots  # each row's own new slot is among its positions
    plan = cpu_gemm.DecodeAttention(table, positions + 1, cache_rows, writes=slots)
    rot = cpu_gemm.Rotary(cos, sin, positions)
    h, x = torch.randn(rows, hidden), torch.randn(rows, hidden)

    k2, v2, h2 = kc.clone(), vc.clone(), h.clone()
    y = qkv(x)
    unrotated = y.clone()
    rot(y, heads + kv_heads, dim)
    half = dim // 2
    u = unrotated[:, :(heads + kv_heads) * dim].view(rows, -1, dim)
    c, s = cos[positions][:, None], sin[positions][:, None]
    textbook = torch.cat([u[..., :half] * c - u[..., half:] * s, u[..., half:] * c + u[..., :half] * s], -1)
    assert torch.allclose(y[:, :(heads + kv_heads) * dim].view(rows, -1, dim), textbook, atol=1e-6)
    q = y[:, :heads * dim].view(rows, heads, dim)
    k2[slots] = y[:, heads * dim:(heads + kv_heads) * dim].view(rows, kv_heads, dim)
    v2[slots] = y[:, (heads + kv_heads) * dim:].reshape(rows, kv_heads, dim)
    want = tail(h2, plan(q, k2, v2))

    got = layer(h, x, rot, plan, kc, vc)
    assert torch.equal(got, want) and torch.equal(h, h2) and torch.equal(kc, k2) and torch.equal(vc, v2)
    with pytest.raises(ValueError, match="caches"):
        layer(h, x, rot, plan, kc[:10], vc)
    with pytest.raises(ValueError, match="own slots"):  # a plan that says nothing of where each row's K/V go
        layer(h, x, rot, cpu_gemm.DecodeAttention(table, positions + 1, cache_rows), kc, vc)
    with pytest.raises(ValueError, match="own cache slots"):
        cpu_gemm.DecodeAttention(table, positions + 1, cache_rows, writes=torch.tensor([5, 17, cache_rows]))
    with pytest.raises(ValueError, match="positions"):
        cpu_gemm.Rotary(cos, sin, torch.tensor([0, 64]))

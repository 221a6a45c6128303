"""Each kernel against its torch reference on odd shapes (Triton interpreter on CPU, the real thing on a GPU)."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cocoon_faas.kernels as K  # noqa: E402
from cocoon_faas.kernels import _dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not (_dispatch.HAS_TRITON and _dispatch.INTERPRET):
    pytest.skip("cocoon_faas.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DTYPES = [torch.float32, torch.float16]
if DEVICE == "cuda" and torch.cuda.is_bf16_supported():
    DTYPES.append(torch.bfloat16)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got, want, dtype, scale=1.0):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype] * scale)


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 384), (7, 129), (129, 64), (1000, 33)])
def test_norms(rows, cols, dtype):
    x, r = _rand(rows, cols, dtype=dtype), _rand(rows, cols, dtype=dtype)
    w, b = _rand(cols, dtype=dtype), _rand(cols, dtype=dtype)
    with K.backend("triton"):
        ln, ln_res = K.layer_norm(x, w, b, 1e-5), K.layer_norm(x, w, b, 1e-12, residual=r)
        rms = K.rms_norm(x, w, 1e-6)
        rms2, h = K.add_rms_norm(x, r, w, 1e-5)
    _close(ln, K.layer_norm_reference(x, w, b, 1e-5), dtype, 2)
    _close(ln_res, K.layer_norm_reference(x, w, b, 1e-12, residual=r), dtype, 2)
    _close(rms, K.rms_norm_reference(x, w, 1e-6), dtype, 2)
    want, want_h = K.add_rms_norm_reference(x, r, w, 1e-5)
    _close(rms2, want, dtype, 2)
    _close(h, want_h, dtype)
    # independent check of the reference itself: mean 0 / unit variance before the affine part
    one = torch.ones(cols, device=DEVICE, dtype=torch.float32)
    plain = K.layer_norm(x.float(), one, torch.zeros_like(one), 1e-12)
    assert plain.mean(-1).abs().max() < 1e-4 and (plain.var(-1, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1536), (7, 258), (3, 5, 66), (1000, 32)])
def test_bias_gelu_and_swiglu(shape, dtype):
    x = _rand(*shape, dtype=dtype) * 3
    b = _rand(shape[-1], dtype=dtype)
    with K.backend("triton"):
        y, s = K.bias_gelu(x, b), K.swiglu(x)
    _close(y, K.bias_gelu_reference(x, b), dtype)
    _close(s, K.swiglu_reference(x), dtype, 2)
    assert s.shape == (*shape[:-1], shape[-1] // 2)
    # GELU(h) ~ h for large positive h, ~0 for large negative h
    big = torch.tensor([[8.0, -8.0]], device=DEVICE, dtype=torch.float32)
    with K.backend("triton"):
        g = K.bias_gelu(big, torch.zeros(2, device=DEVICE))
    assert abs(g[0, 0].item() - 8.0) < 1e-4 and abs(g[0, 1].item()) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 129), (129, 1000), (3, 20000)])
def test_softmax(rows, cols, dtype):
    x = _rand(rows, cols, dtype=dtype) * 4
    with K.backend("triton"):
        y = K.softmax(x, scale=0.7)
    _close(y, K.softmax_reference(x, 0.7), dtype, 0.5 if cols > 1000 else 1)
    torch.testing.assert_close(y.float().sum(-1), torch.ones(rows, device=DEVICE), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,heads,dim", [(1, 9, 64), (17, 3, 32), (300, 2, 64)])
def test_rotary(seq, heads, dim, dtype):
    cos, sin = K.rope_tables(dim, 1024, base=100000.0, device=DEVICE)
    x = _rand(2, seq, heads, dim, dtype=dtype)
    pos = (torch.arange(seq, device=DEVICE)[None] + torch.tensor([[0], [5]], device=DEVICE)).contiguous()
    with K.backend("triton"):
        y = K.rotary(x, cos, sin, pos)
    _close(y, K.rotary_reference(x, cos, sin, pos), dtype)
    # a rotation keeps each pair's norm
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=TOL[dtype] * 10, rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,hq,hkv,dim", [(1, 4, 4, 32), (17, 6, 2, 64), (300, 3, 1, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_prefill(seq, hq, hkv, dim, causal, dtype):
    q = _rand(2, seq, hq, dim, dtype=dtype).transpose(1, 2)  # strided views, as the models pass them
    k = _rand(2, seq, hkv, dim, dtype=dtype).transpose(1, 2)
    v = _rand(2, seq, hkv, dim, dtype=dtype).transpose(1, 2)
    lengths = torch.tensor([seq, max(1, seq // 3)], device=DEVICE)
    with K.backend("triton"):
        out = K.attention_prefill(q, k, v, causal=causal, lengths=lengths)
    want = K.attention_prefill_reference(q.float(), k.float(), v.float(), causal=causal, lengths=lengths)
    _close(out, want.to(dtype), dtype, 2)


def test_attention_prefill_chunk_against_longer_keys():
    """Causal with Sq < Sk aligns queries to the last positions (prefill after a cached prefix)."""
    q, k, v = _rand(1, 4, 5, 32, dtype=torch.float32), _rand(1, 2, 23, 32, dtype=torch.float32), _rand(
        1, 2, 23, 32, dtype=torch.float32
    )
    with K.backend("triton"):
        out = K.attention_prefill(q, k, v, causal=True)
    _close(out, K.attention_prefill_reference(q, k, v, causal=True), torch.float32)
    # the last query row sees every key: equals plain attention of that row
    full = K.attention_prefill_reference(q[:, :, -1:], k, v)
    _close(out[:, :, -1:], full, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,dim", [(9, 3, 64), (4, 4, 32)])
def test_attention_decode(hq, hkv, dim, dtype):
    kc = _rand(3, hkv, 1100, dim, dtype=dtype)
    vc = _rand(3, hkv, 1100, dim, dtype=dtype)
    q = _rand(3, hq, dim, dtype=dtype)
    lengths = torch.tensor([1, 17, 1030], device=DEVICE)  # 1030 spans three splits
    with K.backend("triton"):
        out = K.attention_decode(q, kc, vc, lengths, max_len=1100)
    _close(out, K.attention_decode_reference(q.float(), kc.float(), vc.float(), lengths).to(dtype), dtype, 2)
    # length 1: the output is exactly the single cached value row (repeated over the group)
    _close(out[0], vc[0, :, 0].repeat_interleave(hq // hkv, dim=0), dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,dim,bs", [(9, 3, 64, 16), (4, 4, 40, 32)])
def test_paged_attention_decode(hq, hkv, dim, bs, dtype):
    """Blocks scattered through the pool in a shuffled order (and one block shared by two sequences) give the
    same output as the sequences' caches laid out contiguously."""
    lengths = torch.tensor([1, 17, 70, 33], device=DEVICE)
    nblk = [-(-int(n) // bs) for n in lengths]
    perm = torch.randperm(sum(nblk) + 5).tolist()
    tables = torch.zeros(4, max(nblk), dtype=torch.int32)
    kp = _rand(len(perm), bs, hkv, dim, dtype=dtype)
    vp = _rand(len(perm), bs, hkv, dim, dtype=dtype)
    it = iter(perm)
    for b, n in enumerate(nblk):
        for j in range(n):
            tables[b, j] = next(it)
    tables[3, 0] = tables[2, 0]  # a shared prefix block
    tables = tables.to(DEVICE)
    q = _rand(4, hq, dim, dtype=dtype)
    with K.backend("triton"):
        out = K.paged_attention_decode(q, kp, vp, tables, lengths)
    ref = K.paged_attention_decode_reference(q.float(), kp.float(), vp.float(), tables, lengths)
    _close(out, ref.to(dtype), dtype, 2)
    # independent of the paged reference: the contiguous decode op on gathered caches
    t = int(lengths.max())
    kc, vc = K.gather_blocks(kp.float(), tables, t), K.gather_blocks(vp.float(), tables, t)
    dense = K.attention_decode_reference(q.float(), kc, vc, lengths)
    _close(out, dense.to(dtype), dtype, 2)
    _close(out[0], vp[tables[0, 0].long(), 0].repeat_interleave(hq // hkv, dim=0), dtype, 2)
    with pytest.raises(ValueError, match="block_tables"):
        K.paged_attention_decode(q, kp, vp, tables[:2], lengths)


def test_dispatch_rules():
    x = torch.randn(2, 8)
    with K.backend("torch"):
        assert not K.use_triton(x)
    with K.backend("triton"):
        assert K.use_triton(x)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with K.backend("cuda"):
            pass
    with pytest.raises(TypeError, match="not supported"):
        K.softmax(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        K.attention_prefill(torch.randn(1, 3, 4, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))


def _naive_attention(q, k, v, lengths, causal):
    """softmax(q k^T / sqrt(D)) v in float64, one (batch, head) at a time: the definition, no shortcuts."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(lengths[i])
        for h in range(hq):
            s = q[i, h].double() @ k[i, h // group, :n].double().T / d**0.5
            if causal:
                off = k.shape[2] - sq
                s = s.masked_fill(torch.arange(n, device=q.device)[None] > torch.arange(sq, device=q.device)[:, None]
                                  + off, float("-inf"))
            out[i, h] = torch.softmax(s, -1) @ v[i, h // group, :n].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_references_against_the_definition(causal):
    """The CPU fast paths of the references (padding mask as [B, 1, 1, Sk], no mask when nothing is padded,
    decode with every cached position valid) agree with attention computed from its definition."""
    q, k, v = (_rand(2, h, 9, 32, dtype=torch.float32) for h in (6, 2, 2))
    for lengths in (torch.tensor([9, 4]), torch.tensor([9, 9])):
        got = K.attention_prefill_reference(q, k, v, causal=causal, lengths=lengths.to(DEVICE))
        want = _naive_attention(q, k, v, lengths, causal)
        rows = slice(None) if not causal else slice(0, 4)  # causal rows past a short length see no keys
        torch.testing.assert_close(got[:, :, rows].double(), want[:, :, rows], atol=1e-5, rtol=1e-5)
    full = torch.full((2,), 9, device=DEVICE)
    dec = K.attention_decode_reference(q[:, :, -1], k, v, full)
    torch.testing.assert_close(dec.double(), _naive_attention(q[:, :, -1:], k, v, full, False)[:, :, 0],
                               atol=1e-5, rtol=1e-5)
    short = torch.tensor([3, 9], device=DEVICE)
    dec = K.attention_decode_reference(q[:, :, -1], k, v, short)
    torch.testing.assert_close(dec.double(), _naive_attention(q[:, :, -1:], k, v, short, False)[:, :, 0],
                               atol=1e-5, rtol=1e-5)


def test_linear_bias_gelu_paths_agree():
    """Weights transposed once to [in, out]; both paths give gelu(x W^T + b) from its definition."""
    x, w, b = _rand(7, 33, dtype=torch.float32), _rand(40, 33, dtype=torch.float32), _rand(40, dtype=torch.float32)
    h = x.double() @ w.double().T + b.double()
    want = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    wt = K.transposed(w)
    assert wt.shape == (33, 40) and wt.is_contiguous()
    torch.testing.assert_close(K.linear_t(x[None], wt, b)[0].double(), h, atol=1e-4, rtol=1e-4)
    for path in ("torch", "triton"):
        with K.backend(path):
            torch.testing.assert_close(K.linear_bias_gelu(x, wt, b).double(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[in, out\]"):
        K.linear_t(x, w)

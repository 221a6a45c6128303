"""GGUF block formats (Q8_0, Q4_0, Q4_1) and the dequantizing linear: the repacked blocks give the `gguf`
package's values bit for bit, the Triton GEMV/GEMM (interpreted on CPU, real on a GPU) and torch's packed int4
CPU path against the dequantize-then-matmul reference, on odd shapes."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / cocoon_faas.kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cocoon_faas.kernels as K  # noqa: E402
from cocoon_faas.kernels import _dispatch  # noqa: E402
from cocoon_faas.kernels.quant import (  # noqa: E402
    QuantWeight,
    cat_rows,
    dequantize,
    from_gguf,
    pack_q4,
    quantize,
    unpack_q4,
)
from cocoon_faas.kernels.quant_linear import CpuInt4Linear, quant_linear, quant_linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ["q8_0", "q4_0", "q4_1"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |W|^T: the scale of every rounding error in a dot product of x with W's rows."""
    return x.abs().float() @ w.abs().t()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_repacked_blocks_dequantize_like_gguf(qtype):
    gguf = pytest.importorskip("gguf")
    t = getattr(gguf.GGMLQuantizationType, qtype)
    data = np.random.default_rng(3).standard_normal((7, 96)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(data, t)  # uint8 [7, 3 blocks * bytes]
    want = torch.from_numpy(gguf.quants.dequantize(raw, t))
    w = from_gguf(qtype, raw)
    assert w.shape == (7, 96)
    assert torch.equal(dequantize(w), want)  # bit for bit, so "gguf" precision starts from the file's values
    assert (dequantize(w) - torch.from_numpy(data)).abs().max() < 0.05 * (0.02 if qtype == "Q8_0" else 0.3)
    with pytest.raises(ValueError, match="not block-quantized"):
        from_gguf("Q6_K", raw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_error_is_half_a_step(fmt):
    """At most half a step of the stored scale; Q4_0 (ggml's rule puts the largest magnitude on code 0, so +8
    steps on the other side clamps to code 15) up to one step at that end."""
    w = torch.randn(5, 160) * torch.logspace(-3, 1, 5)[:, None]  # rows of very different scales
    q = quantize(w, fmt)
    step = q.d.float().abs().repeat_interleave(32, dim=1)
    err = (dequantize(q) - w).abs()
    assert (err <= step * (1.0 if fmt == "q4_0" else 0.5) + 1e-6 * w.abs()).all(), (err / step).max()
    assert torch.equal(unpack_q4(pack_q4(unpack_q4(q.qs))), unpack_q4(q.qs)) if q.fmt == "q4" else True
    both = cat_rows([q, q.rows(torch.tensor([4, 0]))])
    assert torch.equal(dequantize(both)[5:], dequantize(q)[[4, 0]])
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(3, 40), fmt)


@pytest.mark.skipif(DEVICE == "cpu" and not (_dispatch.HAS_TRITON and _dispatch.INTERPRET),
                    reason="cocoon_faas.kernels was imported before TRITON_INTERPRET=1 was set")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,n,k", [(1, 37, 96), (3, 65, 160), (7, 33, 64), (33, 19, 96)])
def test_triton_quant_linear_matches_reference(fmt, dtype, rows, n, k):
    """M <= 4 takes the GEMV kernel, larger M the tl.dot GEMM. The codes are small integers, exact in fp16 and
    fp32, and the scales are applied per block in fp32, so the only rounding is the fp32 accumulation and (fp16)
    the output: tolerance 2^-20 |x||W| plus one ulp of the output (kernel and reference each round once)."""
    w = quantize(torch.randn(n, k), fmt).to(DEVICE)
    x = torch.randn(2, rows, k, device=DEVICE).to(dtype)[1]  # a view with a row stride, as the models pass
    with K.backend("triton"):
        got = quant_linear(x, w)
    want = quant_linear_reference(x, w)
    assert got.shape == (rows, n) and got.dtype == dtype
    out_eps = 2.0**-10 if dtype == torch.float16 else 2.0**-23
    tol = _bound(x, dequantize(w)) * 2.0**-20 + want.float().abs() * out_eps + 1e-6
    assert ((got.float() - want.float()).abs() <= tol).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_int4_packing_is_lossless_and_bf16_within_bound(fmt):
    """torch's int4 weight-only GEMM holds every code: with fp32 activations and scales it reproduces the
    reference to fp32 rounding. Its fast path (bf16 activations, scales and output, 8 significant bits: relative
    rounding 2^-9 on x, on each scale and zero, and on y) stays within 2^-9 * 4 of |x| @ (|W| + per-block scale
    terms)^T plus 2^-8 |y|: the bound we state for the CPU "gguf" precision."""
    w = quantize(torch.randn(48, 96), fmt)
    x = torch.randn(5, 96)
    want = quant_linear_reference(x, w)
    exact = CpuInt4Linear(w, torch.float32)(x)
    assert ((exact - want).abs() <= _bound(x, dequantize(w)) * 2.0**-20 + 1e-6).all()
    fast = CpuInt4Linear(w)(x)
    assert fast.dtype == torch.float32 and fast.shape == (5, 48)
    d = w.d.float().abs().repeat_interleave(32, dim=1)
    terms = dequantize(w).abs() + 16 * d + (w.m.float().abs().repeat_interleave(32, dim=1) if w.m is not None else 0)
    tol = _bound(x, terms) * 2.0**-7 + want.abs() * 2.0**-8
    assert ((fast - want).abs() <= tol).all()
    assert not torch.equal(fast, want)  # it really ran in bf16 (else the bound above tests nothing)
    odd = CpuInt4Linear(quantize(torch.randn(37, 64), fmt))  # N padded to the packing's multiple of 16
    assert odd(torch.randn(2, 64)).shape == (2, 37)


def test_quant_weight_checks_its_planes():
    with pytest.raises(ValueError, match="does not match"):
        QuantWeight("q8_0", torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown quantized format"):
        QuantWeight("q5_k", torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="features"):
        quant_linear(torch.randn(2, 32), quantize(torch.randn(4, 64), "q8_0"))

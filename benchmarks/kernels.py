"""Each kernel vs torch eager and torch.compile on the same inputs; prints GB/s or TFLOP/s, the fraction of the
device's peak, and the ratio to each baseline.

    python benchmarks/kernels.py                 # GPU if present, else CPU (our path = the torch reference)
    python benchmarks/kernels.py --no-compile --ops softmax,attention_prefill

On a GPU "ours" is the Triton kernel, timed with triton's do_bench (median). On CPU "ours" is what the dispatch
runs there (the torch reference), "peak" is the measured copy bandwidth of this machine (no vendor figure exists
for a shared VM), and ours and the baselines take turns call by call (`cocoon_faas.kernels.timing.interleaved`,
medians, one pinned thread count); the load average at start and end is printed so the reader can judge.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import cocoon_faas.kernels as K
from cocoon_faas.kernels.timing import interleaved, load_average, pin_threads

# vendor peaks: (HBM bytes/s, dense 16-bit tensor FLOP/s)
PEAKS = {
    "H100 80GB HBM3": (3.35e12, 989e12), "H100 PCIe": (2.0e12, 756e12), "H100 NVL": (3.9e12, 835e12),
    "H200": (4.8e12, 989e12), "A100-SXM4-80GB": (2.04e12, 312e12), "A100-SXM4-40GB": (1.56e12, 312e12),
    "L4": (0.3e12, 121e12), "A10G": (0.6e12, 125e12),
}


def bench_all(fns: list[Callable[[], object]], device: str, reps: int, threads: int | None) -> list[float]:
    """Median seconds per call of each fn. GPU: triton's do_bench (its own warm-up, median of many launches).
    CPU: `interleaved`, the fns taking turns call by call after a warm-up round, so load from other processes
    hits them alike; `inner` calls per sample keep each sample above a millisecond."""
    if device == "cuda":
        import triton.testing

        return [triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3 for fn in fns]
    for fn in fns:
        fn()
    t = time.perf_counter()
    fns[0]()
    inner = max(1, min(50, int(2e-3 / max(time.perf_counter() - t, 1e-7))))
    r = interleaved({str(i): fn for i, fn in enumerate(fns)}, reps=reps, inner=inner, threads=threads)
    return [r.median(str(i)) for i in range(len(fns))]


def peaks(device: str, dtype: torch.dtype) -> tuple[float | None, float | None, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, (bw, fl) in PEAKS.items():
            if key.lower() in name.lower():
                return bw, (fl if dtype != torch.float32 else fl / 2), name
        return None, None, name
    x = torch.empty(64 * 2**20, dtype=torch.uint8)
    y = torch.empty_like(x)
    (t,) = bench_all([lambda: y.copy_(x)], "cpu", 10, None)
    return 2 * x.numel() / t, None, "CPU (peak = measured copy bandwidth)"


def cases(device: str, dtype: torch.dtype, big: bool):
    """(name, kind, work, ours, eager) with work in bytes ("GB/s") or FLOPs ("TFLOP/s")."""
    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    es = torch.tensor([], dtype=dtype).element_size()
    m, n = (16384, 8192) if big else (2048, 1024)
    x, res, w, b = r(m, n), r(m, n), r(n), r(n)
    yield ("layer_norm+residual", "GB/s", 3 * m * n * es, lambda: K.layer_norm(x, w, b, 1e-5, residual=res),
           lambda: F.layer_norm(x + res, (n,), w, b, 1e-5))
    yield ("rms_norm", "GB/s", 2 * m * n * es, lambda: K.rms_norm(x, w, 1e-6),
           lambda: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w)
    yield ("add_rms_norm", "GB/s", 4 * m * n * es, lambda: K.add_rms_norm(x, res, w, 1e-6),
           lambda: (lambda h: ((h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6))
                                .to(dtype) * w, h))(x + res))
    yield ("bias_gelu", "GB/s", 2 * m * n * es, lambda: K.bias_gelu(x, b), lambda: F.gelu(x + b))
    gu = r(m, 2 * n)
    yield ("swiglu", "GB/s", 3 * m * n * es, lambda: K.swiglu(gu), lambda: F.silu(gu[:, :n]) * gu[:, n:])
    yield ("softmax", "GB/s", 2 * m * n * es, lambda: K.softmax(x), lambda: torch.softmax(x, -1))
    sv = r(64 if big else 8, 49152)
    yield ("softmax (49k vocab)", "GB/s", 2 * sv.numel() * es, lambda: K.softmax(sv), lambda: torch.softmax(sv, -1))
    bsz, seq, h, d = (16, 2048, 32, 128) if big else (2, 256, 9, 64)
    q = r(bsz, seq, h, d)
    cos, sin = K.rope_tables(d, seq, device=device)
    pos = torch.arange(seq, device=device)[None].expand(bsz, seq).contiguous()
    yield ("rotary", "GB/s", 2 * q.numel() * es, lambda: K.rotary(q, cos, sin, pos),
           lambda: K.rotary_reference(q, cos, sin, pos))
    hkv = h // 4 if big else 3
    qh, kh, vh = r(bsz, h, seq, d), r(bsz, hkv, seq, d), r(bsz, hkv, seq, d)
    flops = 4 * bsz * h * seq * seq * d / 2
    yield ("attention_prefill causal GQA", "TFLOP/s", flops, lambda: K.attention_prefill(qh, kh, vh, causal=True),
           lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True))
    ctx = 8192 if big else 1024
    kc, vc, qd = r(bsz, hkv, ctx, d), r(bsz, hkv, ctx, d), r(bsz, h, d)
    lens = torch.full((bsz,), ctx, device=device, dtype=torch.int32)
    yield ("attention_decode GQA", "GB/s", 2 * kc.numel() * es, lambda: K.attention_decode(qd, kc, vc, lens),
           lambda: F.scaled_dot_product_attention(qd[:, :, None], kc, vc, enable_gqa=True)[:, :, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--ops", default="", help="comma-separated substrings of op names to run")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--reps", type=int, default=15, help="interleaved samples per candidate (CPU)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    args = ap.parse_args()
    pin_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    bw, flops_peak, name = peaks(args.device, dtype)
    print(f"device: {name}; dtype: {dtype}; torch {torch.__version__}"
          + (f"; peak {bw / 1e9:.0f} GB/s" if bw else "") + (f", {flops_peak / 1e12:.0f} TFLOP/s" if flops_peak else "")
          + f"; threads {torch.get_num_threads()}; load average at start {'/'.join(f'{x:.2f}' for x in load_average())}")
    print(f"{'op':32} {'ours':>10} {'eager':>10} {'compile':>10} {'unit':>8} {'%peak':>6} {'x eager':>8} {'x compile':>9}")
    for op, unit, work, ours, eager in cases(args.device, dtype, args.device == "cuda"):
        if args.ops and not any(s and s in op for s in args.ops.split(",")):
            continue
        scale = 1e9 if unit == "GB/s" else 1e12
        fns = [ours, eager]
        if not args.no_compile:
            try:
                compiled = torch.compile(eager)
                compiled()
                fns.append(compiled)
            except Exception as e:  # inductor needs a C++ compiler / triton; report, keep going
                print(f"  torch.compile failed for {op}: {type(e).__name__}: {str(e)[:80]}")
        t_ours, t_eager, *rest = bench_all(fns, args.device, args.reps, args.threads)
        t_comp = rest[0] if rest else math.nan
        peak = bw if unit == "GB/s" else flops_peak
        frac = f"{work / t_ours / peak * 100:5.0f}%" if peak else "   n/a"
        print(f"{op:32} {work / t_ours / scale:10.3g} {work / t_eager / scale:10.3g} {work / t_comp / scale:10.3g} "
              f"{unit:>8} {frac:>6} {t_eager / t_ours:8.2f} {t_comp / t_ours:9.2f}")
    print(f"load average at end {'/'.join(f'{x:.2f}' for x in load_average())}; ratios are of medians (> 1: ours "
          "is faster)")


if __name__ == "__main__":
    main()

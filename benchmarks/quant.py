"""SmolLM2-135M decode speed, memory and accuracy per weight precision, side by side.

    python benchmarks/quant.py                              # CPU: fp32, gguf, q8, q4; 2 threads
    python benchmarks/quant.py --precisions fp32,gguf --reps 9
    python benchmarks/quant.py --device cuda                # GPU: adds fp16, bf16 (quantized = Triton kernels)
    python benchmarks/quant.py --ops                        # CPU: the candidate ops on one layer's shapes

Precisions (`kernels/models/smollm.py`): "gguf" runs the file's blocks as stored (Q4_1 projections, Q8_0
embedding; on CPU through torch's int4 GEMM with bf16 at the GEMM boundary, the tied LM head in fp32 from the
Q8_0 values), "q8"/"q4" requantize every block to Q8_0/Q4_1, "fp32"/"fp16"/"bf16" dequantize at load.

Per precision: one decode step at batch 1 and at batch 8 (cache of 48 prompt positions, the step re-run at the
same position), and a 64-token prefill; tokens/s = batch / step time. The candidates take turns call by call
(`cocoon_faas.kernels.timing.interleaved`, medians, one pinned thread count) and the load average at start and
end is printed: read the ratios to fp32, not the absolute figures, on a shared box. "weights" is what the
forward pass reads (`SmolLM.weight_bytes`). Accuracy: the largest |logit - fp32 logit| over 16 teacher-forced
steps of fp32's greedy continuation, and how many of those steps pick fp32's token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cocoon_faas.kernels.models.smollm import KVCache, SmolLM  # noqa: E402
from cocoon_faas.kernels.quant import quantize  # noqa: E402
from cocoon_faas.kernels.quant_linear import CpuInt4Linear  # noqa: E402
from cocoon_faas.kernels.timing import interleaved, load_average, pin_threads  # noqa: E402

PROMPT = [{"role": "user", "content": "Write two sentences about the sea and the wind."}]


def decode_step(model: SmolLM, batch: int, past: int) -> tuple[KVCache, torch.Tensor]:
    cache = model.new_cache(past + 1, batch)
    ids = torch.randint(0, model.config.vocab, (batch, past), device=model.device)
    model.forward(ids, cache)
    return cache, ids[:, -1:]


def teacher_forced(model: SmolLM, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    cache = model.new_cache(len(ids) + len(steps) + 1)
    out = [model.forward(torch.tensor([ids], device=model.device), cache)[0]]
    for t in steps:
        out.append(model.forward(torch.tensor([[t]], device=model.device), cache)[0])
    return out


def ops(threads: int, reps: int) -> None:
    """The CPU weight-only ops on SmolLM2's four projection shapes x `layers` (weights cycling, out of cache):
    fp32 mm on [in, out], torch's int4 GEMM with bf16 and with fp32 activations, int8 per channel (bf16)."""
    layers = 8
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * layers
    w32 = [torch.randn(n, k) * 0.05 for n, k in shapes]
    wt = [w.t().contiguous() for w in w32]
    q4 = [CpuInt4Linear(quantize(w, "q4_1")) for w in w32]
    q4f = [CpuInt4Linear(quantize(w, "q4_1"), torch.float32) for w in w32]
    s8 = [w.abs().amax(1) / 127 for w in w32]
    q8 = [torch.round(w / s[:, None]).to(torch.int8) for w, s in zip(w32, s8, strict=True)]
    s8b = [s.bfloat16() for s in s8]
    for m in (1, 8, 64):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        fns = {
            "fp32 mm": lambda xs=xs: [torch.mm(xs[t.shape[0]], t) for t in wt],
            "int4 bf16": lambda xs=xs: [f(xs[f.shape[1]]) for f in q4],
            "int4 fp32": lambda xs=xs: [f(xs[f.shape[1]]) for f in q4f],
            "int8 bf16": lambda xs=xs: [torch._weight_int8pack_mm(xs[q.shape[1]].bfloat16(), q, s)
                                        for q, s in zip(q8, s8b, strict=True)],
        }
        r = interleaved(fns, reps=reps, threads=threads)
        cells = ", ".join(f"{k} {r.median(k) * 1e3:.2f} ms ({r.speedup(k, 'fp32 mm'):.2f}x)" for k in fns)
        print(f"M={m:3d}: {cells}")
        print(f"       {r.load_line()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default=None, help="comma list (default: fp32,gguf,q8,q4; GPU adds fp16,bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ops", action="store_true", help="time the CPU weight-only ops instead of the model")
    args = ap.parse_args()
    if args.ops:
        ops(args.threads, args.reps)
        return
    cuda = args.device == "cuda"
    names = (args.precisions or ("fp16,fp32,bf16,gguf,q8,q4" if cuda else "fp32,gguf,q8,q4")).split(",")
    if "fp32" not in names:
        names.insert(0, "fp32")
    pin_threads(None if cuda else args.threads)
    sync = torch.cuda.synchronize if cuda else None
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; load average at start {load_average()}")
    models = {p: SmolLM.load(device=args.device, precision=p) for p in names}
    for p, m in models.items():
        kinds = sorted({q.fmt for q in m.quantized.values()}) or [str(m.dtype).replace("torch.", "")]
        print(f"  {p:5s}: linear weights {'/'.join(kinds)}, activations {str(m.dtype).replace('torch.', '')}, "
              f"weights {m.weight_bytes / 2**20:.0f} MiB")

    # accuracy against fp32 (teacher-forced on fp32's greedy tokens)
    ref_model = models["fp32"]
    ids = ref_model.chat_template(PROMPT)
    greedy = [t for _, t in ref_model.generate(ids, max_tokens=16) if t is not None]
    ref = teacher_forced(ref_model, ids, greedy)
    accuracy = {}
    for p, m in models.items():
        got = teacher_forced(m, ids, greedy)
        diff = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
        same = sum(int(g.argmax() == r.argmax()) for g, r in zip(got, ref, strict=True))
        accuracy[p] = (diff, same, len(ref))

    results = {}
    with torch.inference_mode():
        for batch in (1, 8):
            fns = {}
            for p, m in models.items():
                cache, tok = decode_step(m, batch, 48)

                def step(m=m, cache=cache, tok=tok) -> None:
                    cache.length = 48
                    m.forward(tok, cache)

                fns[p] = step
            results[f"decode b{batch}"] = (batch, interleaved(fns, reps=args.reps, sync=sync))
        fns = {}
        for p, m in models.items():
            pre = torch.randint(0, m.config.vocab, (1, 64), device=m.device)
            fns[p] = lambda m=m, pre=pre: m.forward(pre, m.new_cache(64))
        results["prefill 64"] = (64, interleaved(fns, reps=max(3, args.reps // 2), sync=sync))

    header = f"{'precision':10s} {'weights':>9s} " + " ".join(f"{k + ' tok/s':>17s}" for k in results)
    print("\n" + header + "   max|dlogit|  top-1 = fp32")
    for p, m in models.items():
        cells = []
        for batch, r in results.values():
            tps = batch / r.median(p)
            cells.append(f"{tps:9.1f} ({r.speedup(p, 'fp32'):4.2f}x)")
        diff, same, n = accuracy[p]
        print(f"{p:10s} {m.weight_bytes / 2**20:6.0f} MiB " + " ".join(f"{c:>17s}" for c in cells)
              + f"   {diff:10.3f}  {same}/{n}")
    for k, (_, r) in results.items():
        print(f"{k}: {r.load_line()}")
    print("(x): speed relative to fp32 (> 1: faster); max|dlogit| and top-1 over teacher-forced steps vs fp32")


if __name__ == "__main__":
    main()

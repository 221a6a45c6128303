"""Sentence embeddings with all-MiniLM-L6-v2 on our kernels, served at /fn/Embedder.embed and /v1/embeddings.

The model loads once per replica (`@cocoon.enter`); `@cocoon.batched` gathers concurrent calls (e.g. the inputs
of one OpenAI `/v1/embeddings` request) into one forward pass. CPU by default; deploy with `gpu="any"` (or a
model name) to run the Triton kernels on a GPU replica.
"""

import cocoon_faas as cocoon


@cocoon.cls(cpu=1, memory="2Gi", timeout=60, max_concurrency=32, min_replicas=0, max_replicas=2,
            serves="embeddings:all-MiniLM-L6-v2")
class Embedder:
    @cocoon.enter()
    def load(self) -> None:
        import torch

        from cocoon_faas.kernels.models.minilm import MiniLM

        self.model = MiniLM.load(device="cuda" if torch.cuda.is_available() else "cpu")

    @cocoon.method()
    @cocoon.batched(max_batch_size=32, wait_ms=5)
    def embed(self, text: list) -> list:
        vectors = self.model.embed(text).cpu().tolist()
        tokens = self.model.count_tokens(text)
        return [{"embedding": v, "tokens": n} for v, n in zip(vectors, tokens, strict=True)]


DEMO_CALLS = [("Embedder.embed", {"text": "Confidential compute on TON"})]

"""Functions whose replicas the pipeline tests fake (tests/test_pipeline.py): the code never runs; a fake replica
on loopback answers each call as its `mode` argument (or the last chat message) says."""

import cocoon_faas as cocoon


@cocoon.function(timeout=5, retries=1, min_replicas=2, max_replicas=2, max_concurrency=8)
def work(mode: str = "ok", n: int = 3) -> dict:
    return {"mode": mode}


@cocoon.function(timeout=5, retries=0, min_replicas=1, max_replicas=1, max_concurrency=8)
def fragile(mode: str = "ok", n: int = 3) -> dict:
    return {"mode": mode}


@cocoon.function(timeout=5, retries=1, min_replicas=2, max_replicas=2, max_concurrency=8)
def gen(mode: str = "ok", n: int = 3):
    yield {"mode": mode}


@cocoon.function(timeout=5, min_replicas=1, max_replicas=1, max_concurrency=8, serves="chat:fake-llm",
                 price_per_million_prompt_tokens="2", price_per_million_completion_tokens="8")
def chat(messages: list, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
         seed: int | None = None, stop: list | None = None, n: int = 1, logprobs: bool = False,
         top_logprobs: int = 0):
    yield {"delta": "x"}


@cocoon.function(timeout=5, min_replicas=1, max_replicas=1, max_concurrency=8, serves="embeddings:fake-emb")
def embed(text: str) -> dict:
    return {"embedding": [0.0], "tokens": 1}

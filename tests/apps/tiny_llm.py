"""A tiny deterministic "model" for the OpenAI-route tests: it streams the user's last message back word by word
and reports usage the way an engine-backed chat function does (in its last item); priced per token."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.5, timeout=30, max_concurrency=8, min_replicas=1, max_replicas=1, serves="chat:tiny-echo",
                 price_per_million_prompt_tokens="3", price_per_million_completion_tokens="9")
def tiny_chat(messages: list, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
              seed: int | None = None, stop: list | None = None):
    words = messages[-1]["content"].split()
    prompt = sum(len(m["content"].split()) + 1 for m in messages)
    out = words[:max_tokens]
    for w in out:
        yield {"delta": w.upper() + " "}
    yield {"finish_reason": "length" if len(words) > max_tokens else "stop",
           "usage": {"prompt_tokens": prompt, "completion_tokens": len(out), "cached_tokens": 0}}


@cocoon.function(cpu=0.5, timeout=30, max_concurrency=8, min_replicas=1, max_replicas=1,
                 serves="embeddings:tiny-emb")
def tiny_embed(text: str) -> dict:
    return {"embedding": [float(len(text)), float(sum(map(ord, text)) % 97)], "tokens": len(text.split())}

"""Run a batch of chats through a fresh `cocoon_faas.llm.Engine` on the torch kernels and collect each request's
greedy token ids (the model tests compare them with other references)."""

from __future__ import annotations

import cocoon_faas.kernels as K


def engine_greedy(model, chats: list, max_tokens: int) -> list[list[int]]:
    from cocoon_faas.llm import Engine, SamplingParams

    with K.backend("torch"):  # the engine's steps run in the context it was created in
        engine = Engine(model, kv_blocks=32, max_batch_tokens=24)  # small: prompts span several steps
    try:
        with K.backend("torch"):
            handles = [engine.submit(c, SamplingParams(max_tokens=max_tokens)) for c in chats]
            return [h.result().choices[0].token_ids for h in handles]
    finally:
        engine.close()

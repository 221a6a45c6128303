"""Engine-backed functions small enough for end-to-end tests: `cocoon_faas.llm.Engine` over a 2-layer Llama of
width 32 with random (seeded) weights and a 64-word tokenizer, so it loads in about a second.

Each engine step also sleeps STEP_S, so a long request holds its KV blocks for seconds (the autoscaler must see
it), and the KV pool (KV_BLOCKS blocks of 16 positions) holds one long request (prompt + max_tokens up to 256
tokens) at a time: a second one waits in the engine. Token 2 (end of sequence) never wins, so every request runs
to its max_tokens. Prompts are words "w0".."w63". `TinyQueue` is the same engine with a batch of one and room
for one waiting request: more calls at once are refused by the engine (OverloadedError, a 429)."""

from typing import Any

import cocoon_faas as cocoon

KV_BLOCKS = 16
STEP_S = 0.02


def tiny_engine(**engine_kw: Any) -> Any:
    import time

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    import cocoon_faas.kernels as K
    from cocoon_faas.kernels.models.smollm import LlamaConfig, SmolLM
    from cocoon_faas.llm import Engine
    from cocoon_faas.llm.runner import PagedRunner, StepBatch

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = LlamaConfig(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=64,
                      context=512, rope_base=10000.0, eps=1e-5, bos_id=1, eos_id=2)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    w = {"embed": rand(64, 32), "norm": torch.ones(32)}
    w["embed"][2] = 0.0  # tied LM head: the end-of-sequence logit is 0, never the largest
    for i in range(cfg.layers):
        w.update({f"{i}.qkv": rand(64, 32), f"{i}.o": rand(32, 32), f"{i}.gate_up": rand(128, 32),
                  f"{i}.down": rand(32, 64), f"{i}.ln_attn": torch.ones(32), f"{i}.ln_ffn": torch.ones(32)})
    model = SmolLM(w, cfg, tok, "{% for m in messages %}{{ m['content'] }} {% endfor %}", torch.device("cpu"),
                   torch.float32)

    class SlowRunner(PagedRunner):
        def forward(self, batch: StepBatch) -> torch.Tensor:
            time.sleep(STEP_S)
            return super().forward(batch)

    with K.backend("torch"):  # the engine's steps run in the context it was created in
        return Engine(model, kv_blocks=KV_BLOCKS, block_size=16, runner=SlowRunner(model, KV_BLOCKS, 16), **engine_kw)


async def generate_on(engine: Any, prompt: str, max_tokens: int) -> dict:
    from cocoon_faas.llm import SamplingParams

    handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens))
    tokens = []
    try:
        async for out in handle:
            if out.token_id is not None:
                tokens.append(out.token_id)
    finally:
        if handle.usage is None:  # the caller went away: free the blocks now
            handle.cancel()
    assert handle.usage is not None
    return {"tokens": tokens, "usage": handle.usage.to_dict()}


@cocoon.cls(cpu=0.5, memory="2Gi", timeout=60, max_concurrency=8, min_replicas=1, max_replicas=2)
class TinyEngine:
    @cocoon.enter()
    def load(self) -> None:
        self.engine = tiny_engine()

    @cocoon.method()
    async def generate(self, prompt: str, max_tokens: int = 4) -> dict:
        return await generate_on(self.engine, prompt, max_tokens)


@cocoon.cls(cpu=0.25, memory="2Gi", timeout=30, max_concurrency=8, min_replicas=1, max_replicas=1)
class TinyQueue:
    @cocoon.enter()
    def load(self) -> None:
        self.engine = tiny_engine(max_seqs=1, max_waiting=1)

    @cocoon.method()
    async def generate(self, prompt: str, max_tokens: int = 4) -> dict:
        return await generate_on(self.engine, prompt, max_tokens)

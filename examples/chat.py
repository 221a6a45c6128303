"""Chat with SmolLM2-135M-Instruct on our kernels, streamed token by token: /fn/Chat.generate and
/v1/chat/completions (OpenAI-compatible). CPU by default; deploy with `gpu="any"` for a GPU replica.

One `cocoon_faas.llm.Engine` per replica serves every call: concurrent calls join one running batch (continuous
batching over a paged KV cache, shared prompt prefixes computed once), so `max_concurrency` is the number of
sequences in the batch. The method is an async generator: it waits on the engine without holding a thread, and a
client that goes away closes it, which cancels the request and frees its KV blocks at once.

Usage per call (last item): prompt_tokens, completion_tokens and cached_tokens (prompt tokens served from the
prefix cache, which is per caller: a bot calling for many users shares its system prompt's blocks, two different
callers share none), for per-token pricing. The engine reports its queue and KV occupancy to the gateway, which
scales this function on them. `response_format` {"type": "json_object" | "json_schema"} constrains the
output to JSON (matching the schema)."""

import cocoon_faas as cocoon
from cocoon_faas.openai_compat import check_completion_budget

MAX_SEQS = 32  # memory: the sandbox caps address space; weights (~0.2 GB as the GGUF stores them, the default
# on CPU where our C kernels build; ~0.7 GB with COCOON_LLM_PRECISION=fp32), a 256 MB KV pool, torch


@cocoon.cls(cpu=1, memory="4Gi", timeout=120, max_concurrency=MAX_SEQS, min_replicas=0, max_replicas=2,
            serves="chat:SmolLM2-135M-Instruct")
class Chat:
    @cocoon.enter()
    def load(self) -> None:
        import torch

        from cocoon_faas.kernels import cpu_gemm
        from cocoon_faas.kernels.models.smollm import SmolLM
        from cocoon_faas.llm import Engine, SamplingParams
        from cocoon_faas.settings import get_settings

        precision = get_settings().llm_precision
        if precision == "auto" and not torch.cuda.is_available() and cpu_gemm.available()[0]:
            # the file's blocks on our C kernels: 2-4x fp32's tokens/s at a fifth of the memory, and seeded
            # sampling still repeats (the library's own default stays fp32, see kernels/models/smollm.py)
            precision = "gguf"
        self.model = SmolLM.load(device="cuda" if torch.cuda.is_available() else "cpu", precision=precision)
        self.engine = Engine(self.model, max_seqs=MAX_SEQS, threads=get_settings().llm_threads or None)
        self.params = SamplingParams
        # warm-up: the first step and the grammar tokenizer (~1 s) are paid here, not by the first caller
        self.engine.generate("Hi", SamplingParams(max_tokens=2, response_format={"type": "json_object"}))

    @cocoon.method()
    async def generate(self, messages: list, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, stop: str | list | None = None, response_format: dict | None = None,
                       logprobs: bool = False, top_logprobs: int = 0, n: int = 1, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0, logit_bias: dict | None = None):
        # a per-token call is held for so many completion tokens: more would be work nobody pays for (a sealed call
        # reaches here unread by the gateway, which checks this for plain OpenAI calls)
        check_completion_budget(n, max_tokens)
        params = self.params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             stop=stop, logprobs=logprobs, top_logprobs=top_logprobs, n=n,  # one string or a list
                             response_format=response_format, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        handle = self.engine.submit(messages, params)
        stop_ids = self.model.stop_ids
        finish: dict[int, str] = {}
        try:
            async for out in handle:
                if out.finish_reason is not None:
                    finish[out.index] = out.finish_reason
                    continue
                item: dict = {"delta": out.text}
                if n > 1:
                    item["index"] = out.index
                if logprobs and out.token_id is not None and out.token_id not in stop_ids:  # not the end token
                    item["logprobs"] = {"token": self.model.decode([out.token_id]), "token_id": out.token_id,
                                        "logprob": out.logprob,
                                        "top_logprobs": [[t.token, t.logprob] for t in out.top_logprobs]}
                if out.text or len(item) > 1:
                    yield item
        finally:
            if handle.usage is None:  # the caller went away (or the call timed out): free the blocks now
                handle.cancel()
        assert handle.usage is not None
        yield {"finish_reason": finish.get(0, "stop"), "finish_reasons": [finish.get(i) for i in range(n)],
               "usage": handle.usage.to_dict()}


DEMO_CALLS = [("Chat.generate", {"messages": [{"role": "user", "content": "What is TON? One sentence."}],
                                 "max_tokens": 24})]

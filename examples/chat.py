"""Chat with SmolLM2-135M-Instruct on our kernels, streamed token by token: /fn/Chat.generate and
/v1/chat/completions (OpenAI-compatible). CPU by default; deploy with `gpu="any"` for a GPU replica."""

import cocoon_faas as cocoon


@cocoon.cls(cpu=1, memory="2Gi", timeout=120, max_concurrency=2, min_replicas=0, max_replicas=2,
            serves="chat:SmolLM2-135M-Instruct")
class Chat:
    @cocoon.enter()
    def load(self) -> None:
        import torch

        from cocoon_faas.kernels.models.smollm import SmolLM

        self.model = SmolLM.load(device="cuda" if torch.cuda.is_available() else "cpu")

    @cocoon.method()
    def generate(self, messages: list, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list | None = None):
        gen = self.model.generate(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, stop=stop)
        for piece, _ in gen:
            if piece:
                yield {"delta": piece}
        yield {"finish_reason": gen.finish_reason,
               "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}}


DEMO_CALLS = [("Chat.generate", {"messages": [{"role": "user", "content": "What is TON? One sentence."}],
                                 "max_tokens": 24})]

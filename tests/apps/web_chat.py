"""A light stand-in for examples/chat.py's `Chat.generate` (same name, arguments and streamed items) for the browser
and bot tests (tests/test_e2e_web.py): the real model is issue 12's engine and too slow for a 2-core CI box. Its
answer holds a string the prompt does not (the prompt reversed), so tests can look for both in captured traffic."""

import cocoon_faas as cocoon


@cocoon.cls(cpu=0.25, timeout=30, max_concurrency=4, min_replicas=1, max_replicas=1)
class Chat:
    @cocoon.method()
    def generate(self, messages: list, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list | None = None):
        text = str(messages[-1]["content"])
        if text.startswith("fail:"):
            raise ValueError("the stand-in model refuses prompts that start with 'fail:'")
        words = f"You said: {text[::-1]}".split()[:max_tokens]
        for i, w in enumerate(words):
            yield {"delta": w + (" " if i + 1 < len(words) else "")}
        yield {"finish_reason": "stop", "usage": {"prompt_tokens": len(text.split()), "completion_tokens": len(words)}}


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=4, min_replicas=1, max_replicas=1)
def summarize(text: str, max_words: int = 12) -> dict:
    """What the bot example calls: the first words of the text, and how many there were."""
    words = text.split()
    return {"summary": " ".join(words[:max_words]) + (" …" if len(words) > max_words else ""), "words": len(words)}

"""Pure pieces of text generation: next-token choice (greedy, temperature, top-p) and streaming text with stops.

Sampling draws from a seeded CPU `torch.Generator`, so a (prompt, temperature, top_p, seed) tuple gives the same
tokens on every run of the same device. Streaming decodes the whole completion each step and emits only what is
settled: text ending in an incomplete UTF-8 sequence, or in a prefix of a stop string, waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import softmax


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits [V]."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = softmax(logits[None].float(), scale=1.0 / temperature)[0].cpu()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` might start a stop string (or are a partial UTF-8 char)."""
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class TextStream:
    """Turns generated token ids into settled text pieces, honouring stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly settled text (may be ""). Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        # a trailing partial UTF-8 character decodes as U+FFFD until its last byte comes: stops are looked for
        # only before it, so a stop string with U+FFFD (or ending in one) never matches half a character
        cut = self._stop_at(text, len(text.rstrip("\ufffd")))
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            piece = self.text[self.emitted:]
            self.emitted = len(self.text)
            return piece
        self.text = text
        settled = len(text) - _held_back(text, self.stops)
        if settled <= self.emitted:
            return ""
        piece = text[self.emitted:settled]
        self.emitted = settled
        return piece

    def _stop_at(self, text: str, end: int) -> int:
        """Where the first stop string in text[:end] starts, or -1."""
        return min((i for i in (text.find(s, 0, end) for s in self.stops) if i >= 0), default=-1)

    def flush(self) -> str:
        """Whatever was held back, at the end of generation."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

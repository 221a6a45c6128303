"""The engine's typed values: what a request asks for (`SamplingParams`) and what it gets back (`TokenOutput`,
`Usage`, `Completion`). Validated once, here, with errors that name the parameter and the allowed range."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.openai_compat import MAX_N, MAX_TOP_LOGPROBS, check_int, check_penalty, parse_logit_bias

MAX_STOP_CHARS = 512


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI's meaning). temperature 0 is greedy; `seed` makes sampling
    reproducible (choice i of `n` uses seed + i); `response_format` is OpenAI's object: {"type": "text"},
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    response_format: dict[str, Any] | None = None
    presence_penalty: float = 0.0  # subtracted from the logit of every token the choice has generated
    frequency_penalty: float = 0.0  # subtracted once per time the choice has generated the token
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans it, 100 forces it)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
                                      param="max_tokens")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not 0 <= self.temperature <= 2:
            raise InvalidRequestError(f"temperature must be between 0 and 2, got {self.temperature!r}",
                                      param="temperature")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", param="seed")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):  # a dict would pass its keys
            raise InvalidRequestError(f"stop must be a string or a list of up to 4 strings, got "
                                      f"{type(self.stop).__name__}", param="stop")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop must be a string or up to 4 non-empty strings", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            # matching a stop string costs its length per generated token, on the step thread every request shares
            # (a 100k-character stop stalled everyone's decoding ~50 ms a token); and that much text is held back
            raise InvalidRequestError(f"each stop string may be at most {MAX_STOP_CHARS} characters, got "
                                      f"{max(len(s) for s in stop)}", param="stop")
        object.__setattr__(self, "stop", stop)
        check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.logprobs is None:  # JSON null: not asked for
            object.__setattr__(self, "logprobs", False)
        if not isinstance(self.logprobs, bool):  # "false" is a true value: it would turn logprobs on
            raise InvalidRequestError(f"logprobs must be true or false, got {self.logprobs!r}", param="logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, check_penalty(name, getattr(self, name)))
        object.__setattr__(self, "logit_bias", parse_logit_bias(self.logit_bias))
        check_int("n", self.n, 1, MAX_N)
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                raise InvalidRequestError("response_format must be {'type': 'text' | 'json_object' | 'json_schema'}",
                                          param="response_format")
            if kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                    raise InvalidRequestError(
                        "response_format json_schema needs {'json_schema': {'name': str, 'schema': {...}}}",
                        param="response_format")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusted(self) -> bool:
        """Whether the logits change before sampling (penalties or a bias)."""
        return self.penalized or self.logit_bias is not None

    @property
    def constrained(self) -> bool:
        return self.response_format is not None and self.response_format.get("type") != "text"


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenOutput:
    """One step of one choice: the settled text it adds (may be ""), the token, and its log-probability under
    the model (log-softmax of the raw logits, before temperature, top-p or a grammar mask)."""

    index: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    finish_reason: str | None = None  # set on a choice's last output: "stop" | "length" | "cancelled"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[TopLogprob, ...]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Completion:
    choices: list[Choice]
    usage: Usage

    @classmethod
    def collect(cls, outputs: Sequence[TokenOutput], n: int, usage: Usage) -> Completion:
        choices = [Choice(i) for i in range(n)]
        for o in outputs:
            c = choices[o.index]
            c.text += o.text
            if o.token_id is not None:
                c.token_ids.append(o.token_id)
                if o.logprob is not None:
                    c.logprobs.append(o.logprob)
                    c.top_logprobs.append(o.top_logprobs)
            if o.finish_reason is not None:
                c.finish_reason = o.finish_reason
        return cls(choices, usage)

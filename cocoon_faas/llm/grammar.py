"""Constrained decoding for `response_format` json_object / json_schema, on llguidance (a maintained grammar
library: JSON schema -> grammar, and per step the set of tokens that keep the output inside it).

Each constrained sequence owns a `Constraint`. Before sampling, `mask(logits)` sets every token the grammar
forbids to -inf (the end-of-turn token is allowed only once the JSON is complete); after sampling, `advance(tok)`
feeds the chosen token to the matcher. The tokenizer is wrapped once per model (llguidance builds its token trie
from the tokenizer's JSON, ~1 s).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cocoon_faas.errors import InvalidRequestError

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarTokenizer:
    def __init__(self, tokenizer_json: str, eos_id: int, vocab: int) -> None:
        import llguidance

        self._ll = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos_id)
        self.vocab = vocab

    def constraint(self, response_format: dict[str, Any]) -> Constraint:
        kind = response_format.get("type")
        if kind == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        elif kind == "json_schema":
            schema = response_format.get("json_schema", {}).get("schema") or {}
        else:
            raise InvalidRequestError(f"response_format type {kind!r} takes no grammar", param="response_format")
        grammar = self._ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
        err = self._ll.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise InvalidRequestError(f"response_format schema is not supported: {err}", param="response_format")
        return Constraint(self._ll.LLMatcher(self.tok, grammar, log_level=0), self.vocab)


class Constraint:
    def __init__(self, matcher: Any, vocab: int) -> None:
        self._m = matcher
        self._vocab = vocab

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every token the grammar forbids now set to -inf (a new tensor)."""
        words = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)
        allowed = ((words[:, None] >> _BITS) & 1).flatten()[:self._vocab].bool().to(logits.device)
        out = logits.clone()
        n = min(out.shape[0], allowed.shape[0])
        out[:n][~allowed[:n]] = float("-inf")
        out[n:] = float("-inf")
        return out

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: nothing but end-of-turn may follow."""
        return bool(self._m.is_stopped())

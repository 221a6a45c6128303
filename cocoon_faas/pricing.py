"""What a call costs, in integer nanoton: one module for billing, the marketplace, replica receipts and the CLI.

    charge = compute + royalty + fee
    compute = ceil(exec_s * rate)                      per second (rate: the provider's price for the resources)
            | ceil((prompt * p_prompt + completion * p_completion) / 10**6)   per token, when the function
                                                       declares token prices (nanoton per million tokens)
    fee     = ceil((compute + royalty) * bps / 10**4) + fixed

TON amounts people type go through one parser, `parse_ton`, which refuses floats and more than 9 decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cocoon_faas.ton.amounts import NANO, format_ton, to_nano

CHARGE_HEADER = "X-Cocoon-Charge"  # what a paid call was charged, in nanoton: the gateway's answer, the SDK books it

__all__ = ["HOLD_COMPLETION_TOKENS", "HOLD_PROMPT_TOKENS", "NANO", "FeePolicy", "Price", "TokenPrices", "Usage",
           "compute_cost", "format_ton", "parse_ton", "ton_literal"]

# A per-token call is held for this many tokens (its charge is never more than its hold): the OpenAI routes cap
# max_tokens at 4096, and a prompt larger than this is charged as this many.
HOLD_PROMPT_TOKENS = 32_768
HOLD_COMPLETION_TOKENS = 4_096
MAX_USAGE_TOKENS = 10**9


def parse_ton(value: str | int | Decimal) -> int:
    """TON as a person writes it ("0.05", 5, Decimal("1.5")) -> nanoton; refuses floats and > 9 decimals."""
    return to_nano(value)  # (it refuses "inf", "nan", negatives and more than fits a Coins field too)


def ton_literal(value: Any) -> int:
    """Like `parse_ton`, but a float written in source code (`price=0.001`) is taken as written (its shortest
    repr), which is what a decorator argument means; the CLI and HTTP edges use `parse_ton`."""
    if isinstance(value, float) and math.isfinite(value):
        value = repr(value)
    return parse_ton(value)


@dataclass(frozen=True)
class Price:
    """Provider prices in nanoton per second of one CPU and of one GPU."""

    cpu_per_s: int
    gpu_per_s: int

    def per_second(self, spec: Any) -> float:
        """The rate for one replica of `spec` (its CPUs and GPUs), nanoton per second."""
        gpus = spec.gpu.count if spec.gpu else 0
        return float(spec.cpu * self.cpu_per_s + gpus * self.gpu_per_s)


def compute_cost(exec_ms: float, rate_per_s: float) -> int:
    """Per-second compute charge of `exec_ms` at `rate_per_s`, rounded up to the nanoton (the replica's sealed
    receipt prices the same way, on the millisecond figure it reports)."""
    return math.ceil(round(max(exec_ms, 0.0), 3) / 1000 * rate_per_s)


@dataclass(frozen=True)
class Usage:
    """Token counts an LLM function reports in its result (and in a stream's last item)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_json(cls, value: Any) -> Usage | None:
        """`{"prompt_tokens", "completion_tokens"[, "cached_tokens"]}` with non-negative integer counts, else None
        (a function's output is not trusted to be well formed; a malformed usage is no usage)."""
        if not isinstance(value, dict):
            return None
        counts = []
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            v = value.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_USAGE_TOKENS:
                return None
            counts.append(v)
        if "prompt_tokens" not in value or "completion_tokens" not in value:
            return None
        return cls(*counts)

    def to_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "cached_tokens": self.cached_tokens}


@dataclass(frozen=True)
class TokenPrices:
    """Nanoton per million prompt tokens and per million completion tokens (Cocoon prices the two apart)."""

    prompt_per_million: int
    completion_per_million: int

    def cost(self, usage: Usage) -> int:
        return -(-(usage.prompt_tokens * self.prompt_per_million
                   + usage.completion_tokens * self.completion_per_million) // 1_000_000)

    def max_cost(self) -> int:
        return self.cost(Usage(HOLD_PROMPT_TOKENS, HOLD_COMPLETION_TOKENS))


@dataclass(frozen=True)
class FeePolicy:
    """Operator fee = ceil((provider + royalty) * bps / 10000) + fixed, in nanoton."""

    bps: int = 500
    fixed: int = 0

    def fee(self, provider: int, royalty: int) -> int:
        return -(-(provider + royalty) * self.bps // 10_000) + self.fixed

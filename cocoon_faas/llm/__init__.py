"""A serving engine for the chat models in `cocoon_faas.kernels.models`: continuous batching over a paged KV
cache with prefix reuse, per-request sampling, cancellation, constrained JSON output. See `engine`."""

from .engine import Engine, EngineStats, RequestHandle
from .params import Choice, Completion, SamplingParams, TokenOutput, TopLogprob, Usage

__all__ = ["Choice", "Completion", "Engine", "EngineStats", "RequestHandle", "SamplingParams", "TokenOutput",
           "TopLogprob", "Usage"]

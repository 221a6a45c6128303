"""Function specs: what `@cocoon.function(...)` declares, validated once into immutable values.

A spec holds resources (gpu, cpu, memory), limits (timeout, retries, max_concurrency), scaling bounds and the
developer's royalty. Its canonical JSON is part of the function's measurement, so it must be deterministic.
The sandbox fields (`network`, `env`) appear in it only when set, so specs written before them keep their
measurements.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from typing import Any

from cocoon_faas.errors import CocoonError, InvalidSpecError
from cocoon_faas.pricing import TokenPrices, ton_literal

NANO = 10**9
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_MEM_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_GPU_RE = re.compile(r"^(?P<model>[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(?P<count>\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ENV_RESERVED = ("COCOON_", "RAY_", "LD_", "PYTHON", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class GpuRequest:
    """GPUs a replica needs: `model` None means any model."""

    model: str | None
    count: int = 1

    @property
    def resource(self) -> str | None:
        """The Ray custom resource that names this model (`gpu:H100`), or None for any GPU."""
        return f"gpu:{self.model}" if self.model else None

    def __str__(self) -> str:
        return f"{self.model or 'any'}:{self.count}"


@dataclass(frozen=True)
class BatchSpec:
    """Server-side dynamic batching: concurrent calls share one invocation with lists of arguments."""

    max_batch_size: int
    wait_ms: float


@dataclass(frozen=True)
class FunctionSpec:
    """Everything the platform needs to know to run one function, except its code."""

    name: str
    gpu: GpuRequest | None = None
    cpu: float = 1.0
    memory: int = 512 * 2**20
    timeout: float = 300.0
    retries: int = 0
    max_concurrency: int = 1
    min_replicas: int = 0
    max_replicas: int = 4
    price: int = 0  # royalty, nanoton per call
    kind: str = "function"  # function | async | generator | asyncgen
    batch: BatchSpec | None = None
    serves: tuple[str, ...] = field(default_factory=tuple)  # OpenAI-style "embeddings:<model>", "chat:<model>"
    # per-token pricing (nanoton per million tokens); when either is set, calls are charged per token, not per second
    price_per_million_prompt_tokens: int = 0
    price_per_million_completion_tokens: int = 0
    network: bool = False  # the sandbox shares the host network (else it has none)
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # the sandbox's extra environment, sorted

    @property
    def token_prices(self) -> TokenPrices | None:
        """The function's per-token prices, or None when it is priced per second of compute."""
        if not (self.price_per_million_prompt_tokens or self.price_per_million_completion_tokens):
            return None
        return TokenPrices(self.price_per_million_prompt_tokens, self.price_per_million_completion_tokens)

    @property
    def streams(self) -> bool:
        return self.kind in ("generator", "asyncgen")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["serves"] = list(self.serves)
        for k in ("price_per_million_prompt_tokens", "price_per_million_completion_tokens"):
            if not d[k]:  # absent when unset: specs (and so measurements) of per-second functions are unchanged
                del d[k]
        if not self.network:  # omitted when unset: older specs keep their canonical form (and measurement)
            del d["network"]
        if self.env:
            d["env"] = dict(self.env)
        else:
            del d["env"]
        return d

    def canonical(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FunctionSpec:
        if not isinstance(d, dict):
            raise InvalidSpecError("spec must be a JSON object")
        d = dict(d)
        gpu = d.pop("gpu", None)
        batch = d.pop("batch", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidSpecError(f"unknown spec field(s) {unknown}; known fields: {sorted(known)}")
        d["serves"] = tuple(d.get("serves") or ())
        env = d.pop("env", None) or {}
        if not isinstance(env, dict):
            raise InvalidSpecError("spec field 'env' must be an object of strings")
        spec = cls(
            gpu=GpuRequest(**gpu) if isinstance(gpu, dict) else None,
            batch=BatchSpec(**batch) if isinstance(batch, dict) else None,
            **d,
        )
        return make_spec(
            name=spec.name, gpu=str(spec.gpu) if spec.gpu else None, cpu=spec.cpu, memory=spec.memory,
            timeout=spec.timeout, retries=spec.retries, max_concurrency=spec.max_concurrency,
            min_replicas=spec.min_replicas, max_replicas=spec.max_replicas, price=Decimal(spec.price) / NANO,
            kind=spec.kind, batch=spec.batch, serves=spec.serves,
            price_per_million_prompt_tokens=Decimal(spec.price_per_million_prompt_tokens) / NANO,
            price_per_million_completion_tokens=Decimal(spec.price_per_million_completion_tokens) / NANO,
            network=spec.network, env=env,
        )

    def with_(self, **changes: Any) -> FunctionSpec:
        return replace(self, **changes)


def parse_gpu(value: Any) -> GpuRequest | None:
    """`None` -> CPU only; `"H100"`, `"A100-80GB:2"`, `"any"`, `"any:2"` -> a GpuRequest."""
    if value is None or value is False:
        return None
    if isinstance(value, GpuRequest):
        return value
    if not isinstance(value, str) or not (m := _GPU_RE.match(value.strip())):
        raise InvalidSpecError(
            f"gpu={value!r} is not a GPU request; write a model like gpu=\"H100\", a model and count like "
            "gpu=\"A100-80GB:2\", gpu=\"any\" for any GPU, or gpu=None for CPU only"
        )
    count = int(m["count"] or 1)
    if count < 1 or count > 16:
        raise InvalidSpecError(f"gpu count must be between 1 and 16, got {count} in gpu={value!r}")
    model = m["model"]
    return GpuRequest(None if model.lower() == "any" else model.upper(), count)


def parse_memory(value: Any) -> int:
    """`"1Gi"`, `"512Mi"`, `"2GB"` or an int of bytes -> bytes."""
    if isinstance(value, bool):
        raise InvalidSpecError(f"memory={value!r} is not a size; write memory=\"1Gi\" or memory=\"512Mi\"")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)):
        unit = _MEM_UNITS.get(m[2].lower())
        if unit is None:
            raise InvalidSpecError(f"memory={value!r} has unknown unit {m[2]!r}; use Mi, Gi (or MB, GB)")
        n = int(Decimal(m[1]) * unit)
    else:
        raise InvalidSpecError(f"memory={value!r} is not a size; write memory=\"1Gi\" or memory=\"512Mi\"")
    if n < 16 * 2**20:
        raise InvalidSpecError(f"memory={value!r} is below the 16Mi minimum a replica needs; write memory=\"256Mi\"")
    return n


def parse_price(value: Any, name: str = "price", unit: str = "TON per call") -> int:
    """A price in TON (`0.001`, `"0.001"`, `Decimal`) -> nanoton, exactly (cocoon_faas.pricing's parser)."""
    try:
        return ton_literal(value)
    except CocoonError:
        raise InvalidSpecError(f"{name}={value!r} must be a non-negative amount of TON with at most 9 decimals; "
                               f"write {name}=0.001 ({unit})") from None


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise InvalidSpecError(f"{name}={value!r} must be {kind} between {lo:g} and {hi:g}")
    if not lo <= value <= hi:
        raise InvalidSpecError(f"{name}={value!r} is out of range; write a value between {lo:g} and {hi:g}")
    return value


def make_spec(
    *,
    name: str,
    gpu: Any = None,
    cpu: Any = 1.0,
    memory: Any = "512Mi",
    timeout: Any = 300,
    retries: Any = 0,
    max_concurrency: Any = 1,
    min_replicas: Any = 0,
    max_replicas: Any = 4,
    price: Any = 0,
    kind: str = "function",
    batch: BatchSpec | None = None,
    serves: Any = (),
    price_per_million_prompt_tokens: Any = 0,
    price_per_million_completion_tokens: Any = 0,
    network: Any = False,
    env: Any = None,
) -> FunctionSpec:
    """Validate decorator arguments into a FunctionSpec; raise InvalidSpecError naming the fix."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidSpecError(
            f"name={name!r} is not a valid function name; use letters, digits, '_', '.', '-', start with a "
            "letter or '_', at most 64 characters"
        )
    min_r = _number("min_replicas", min_replicas, 0, 1000, integer=True)
    max_r = _number("max_replicas", max_replicas, 1, 1000, integer=True)
    if min_r > max_r:
        raise InvalidSpecError(f"min_replicas={min_r} exceeds max_replicas={max_r}; raise max_replicas or lower min_replicas")
    if isinstance(serves, str):
        serves = (serves,)
    serves_t = tuple(serves)
    for s in serves_t:
        if not isinstance(s, str) or not re.fullmatch(r"(embeddings|chat|completions):[\w./-]+", s):
            raise InvalidSpecError(f"serves entry {s!r} must look like 'embeddings:<model>', 'chat:<model>' or "
                                   "'completions:<model>'")
    if kind not in ("function", "async", "generator", "asyncgen"):
        raise InvalidSpecError(f"unknown function kind {kind!r}")
    if not isinstance(network, bool):
        raise InvalidSpecError(f"network={network!r} must be True (share the host network) or False (no network)")
    return FunctionSpec(
        name=name,
        gpu=parse_gpu(gpu),
        cpu=float(_number("cpu", cpu, 0.01, 256)),
        memory=parse_memory(memory),
        timeout=float(_number("timeout", timeout, 0.01, 24 * 3600)),
        retries=_number("retries", retries, 0, 10, integer=True),
        max_concurrency=_number("max_concurrency", max_concurrency, 1, 10000, integer=True),
        min_replicas=min_r,
        max_replicas=max_r,
        price=parse_price(price),
        kind=kind,
        batch=batch,
        serves=serves_t,
        price_per_million_prompt_tokens=parse_price(price_per_million_prompt_tokens,
                                                    "price_per_million_prompt_tokens", "TON per million tokens"),
        price_per_million_completion_tokens=parse_price(price_per_million_completion_tokens,
                                                        "price_per_million_completion_tokens",
                                                        "TON per million tokens"),
        network=network,
        env=parse_env(env),
    )


def parse_env(value: Any) -> tuple[tuple[str, str], ...]:
    """`env={"NAME": "value"}` -> sorted pairs. The sandbox gets only these besides its own basics; they are part
    of the spec (and the measurement) the gateway stores, so they are configuration, not secrets."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > 64:
        raise InvalidSpecError(f"env={value!r} must be a dict of at most 64 NAME: value strings")
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise InvalidSpecError(f"env name {k!r} is not a valid variable name; use letters, digits and '_'")
        if k.upper().startswith(_ENV_RESERVED):
            raise InvalidSpecError(f"env name {k!r} is reserved for the platform; pick another name")
        if not isinstance(v, str) or len(v) > 4096:
            raise InvalidSpecError(f"env[{k!r}] must be a string of at most 4096 characters")
    return tuple(sorted(value.items()))

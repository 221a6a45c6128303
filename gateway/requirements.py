"""What one replica of a function needs, and whether a machine's hardware satisfies it.

Users write GPU requirements as ``"H100"``, ``"A100-80GB:2"``, ``"any"``, ``"any:4"`` or nothing (CPU-only); a
FunctionSpec carries them as ``gpu.model``/``gpu.count`` (cocoon_faas/spec.py). A model names a GPU *family*
(runtime/hardware.py reduces product names to one); a ``-NNGB`` suffix asks for at least NN GB per GPU. Prices
are written in TON and kept as integer nanoton.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.pricing import ton_literal
from cocoon_faas.runtime.hardware import Hardware, normalize_model

NANOTON = 1_000_000_000


def ton_to_nanoton(value: str | float | int) -> int:
    """"0.0005" TON -> 500000 nanoton, exactly (cocoon_faas.pricing's one parser: more than 9 decimals is
    refused, never truncated to a lower price)."""
    try:
        return ton_literal(value)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"price: {exc.message}") from None


@dataclass(frozen=True)
class Requirements:
    """What one replica of a function needs. ``gpu_model`` None with ``gpu_count`` > 0 means any GPU."""

    gpu_model: str | None = None
    gpu_count: int = 0
    gpu_min_gb: int = 0
    cpus: float = 0.0
    memory: int = 0
    confidential: bool = False

    @classmethod
    def parse(cls, gpu: str | None = None, *, cpus: float = 0.0, memory: int = 0,
              confidential: bool = False) -> Requirements:
        """``gpu`` as users write it: "H100", "A100-80GB:2", "any", "any:4", or None for CPU-only."""
        if gpu is None or gpu == "":
            return cls(None, 0, 0, float(cpus), int(memory), confidential)
        model, _, count_s = str(gpu).partition(":")
        try:
            count = int(count_s) if count_s else 1
        except ValueError:
            raise InvalidRequestError(f"gpu={gpu!r}: count must be an integer, e.g. gpu='A100-80GB:2'") from None
        if count < 1:
            raise InvalidRequestError(f"gpu={gpu!r}: count must be >= 1")
        return cls.from_parts(model, count, cpus=cpus, memory=memory, confidential=confidential)

    @classmethod
    def from_parts(cls, model: str | None, count: int, *, cpus: float = 0.0, memory: int = 0,
                   confidential: bool = False) -> Requirements:
        if count <= 0:
            return cls(None, 0, 0, float(cpus), int(memory), confidential)
        if model is None or model.strip().lower() in ("", "any"):
            return cls(None, count, 0, float(cpus), int(memory), confidential)
        m = re.search(r"(\d+)\s*GB\b", model, re.IGNORECASE)
        return cls(normalize_model(model), count, int(m.group(1)) if m else 0, float(cpus), int(memory),
                   confidential)

    @classmethod
    def from_spec(cls, spec: Any, confidential: bool = False) -> Requirements:
        """From a ``cocoon_faas.spec.FunctionSpec`` (duck-typed: gpu.model/gpu.count, cpu, memory) and whether the
        deployment is confidential (a deployment flag, not a spec field: only attested nodes may run it)."""
        gpu = getattr(spec, "gpu", None)
        model = getattr(gpu, "model", None) if gpu is not None else None
        count = int(getattr(gpu, "count", 0) or 0) if gpu is not None else 0
        return cls.from_parts(model, count, cpus=float(getattr(spec, "cpu", 0) or 0),
                              memory=int(getattr(spec, "memory", 0) or 0),
                              confidential=confidential)

    @property
    def label(self) -> str:
        """``gpu:H100 x2``, ``gpu:A100-80GB x1``, ``gpu:any x1`` or ``cpu x2``."""
        if not self.gpu_count:
            return f"cpu x{self.cpus:g}"
        name = (self.gpu_model or "any") + (f"-{self.gpu_min_gb}GB" if self.gpu_min_gb else "")
        return f"gpu:{name} x{self.gpu_count}"

    def hardware_fits(self, hw: Hardware) -> bool:
        """Does the machine, empty, satisfy this requirement?"""
        if self.gpu_count:
            if hw.gpu_count < self.gpu_count or not hw.gpu_model:
                return False
            if self.gpu_model is not None and hw.gpu_model != self.gpu_model:
                return False
            if self.gpu_min_gb and hw.gpu_gb < self.gpu_min_gb:
                return False
        return hw.cpus >= self.cpus and hw.memory >= self.memory

    def join_hint(self) -> str:
        if not self.gpu_count:
            return "cocoon provider join"
        name = (self.gpu_model or "H100") + (f"-{self.gpu_min_gb}GB" if self.gpu_min_gb else "")
        return f"cocoon provider join --gpus {name}:{self.gpu_count}"

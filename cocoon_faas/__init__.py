"""Cocoon FaaS: confidential, pay-per-call AI functions.

    import cocoon_faas as cocoon

    @cocoon.function(cpu=1, timeout=30)
    def greet(name: str) -> dict:
        return {"hello": name}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocoon_faas.errors import (
    AttestationError,
    AuthenticationError,
    CallCancelledError,
    CallTimeoutError,
    CocoonError,
    FunctionError,
    InvalidRequestError,
    InvalidSpecError,
    NoCapacityError,
    NotFoundError,
    OverloadedError,
    PaymentError,
    PaymentRequiredError,
    PermissionDeniedError,
)
from cocoon_faas.functions import Cls, Function, batched, cls, enter, function, method
from cocoon_faas.spec import FunctionSpec

if TYPE_CHECKING:
    from cocoon_faas.client import Client, FunctionCall


def __getattr__(name: str) -> Any:
    """`Client` and `FunctionCall` load on first use: they pull in httpx, settings and the confidential client
    (~0.35 s), which a sandboxed function's process (`import cocoon_faas as cocoon` in tenant code, the sandbox
    child, the replica actor) and every deploy would otherwise pay at start-up without ever calling out."""
    if name in ("Client", "FunctionCall"):
        from cocoon_faas import client

        return getattr(client, name)
    raise AttributeError(f"module 'cocoon_faas' has no attribute {name!r}")


__all__ = [
    "AttestationError",
    "AuthenticationError",
    "CallCancelledError",
    "CallTimeoutError",
    "Client",
    "Cls",
    "CocoonError",
    "Function",
    "FunctionCall",
    "FunctionError",
    "FunctionSpec",
    "InvalidRequestError",
    "InvalidSpecError",
    "NoCapacityError",
    "NotFoundError",
    "OverloadedError",
    "PaymentError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "batched",
    "cls",
    "enter",
    "function",
    "method",
]

"""Bounds on what any client may send the gateway: one body limit for every route, bounded JSON.

Every request body passes :class:`BodyLimit` (the ASGI layer under every route): a ``Content-Length`` over the
limit is answered 413 before a byte is read, and a streamed (chunked) body is counted as it arrives, the route
seeing :class:`PayloadTooLargeError` the moment it passes the limit. Routes then parse JSON with
:func:`loads_bounded`, which refuses, with a 400 naming the problem: nesting deeper than ``MAX_DEPTH``, integers
of more than ``MAX_INT_DIGITS`` digits, non-finite numbers (``NaN``, ``Infinity``, ``1e999``) and text that
UTF-8 (so SQLite) cannot hold (a lone UTF-16 surrogate such as ``"\\ud800"``).

The per-call route (``POST /fn/{name}``) is the hot path: it keeps its own read (same limits) and uses
:func:`check_args`, whose cheap byte scans skip the walk over the arguments for ordinary bodies.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cocoon_faas.errors import CocoonError, InvalidRequestError, PayloadTooLargeError

MAX_DEPTH = 64
MAX_INT_DIGITS = 40  # 10**40 > any amount of nanoton; bigger integers only cost the parser (int() is quadratic)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large(limit: int, size: int | None = None) -> PayloadTooLargeError:
    what = f"request body of {size} bytes is" if size is not None else "request body is"
    return PayloadTooLargeError(f"{what} over the {limit}-byte limit; send less data or raise "
                                "COCOON_MAX_BODY_BYTES on the gateway", limit=limit)


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise InvalidRequestError(f"a number in the JSON body has {len(text)} digits (at most {MAX_INT_DIGITS}); "
                                  "send a smaller number")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise InvalidRequestError(f"a number in the JSON body is {len(text)} characters long; send a shorter one")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidRequestError(f"the number {text[:20]} in the JSON body is out of range; send a finite number")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidRequestError(f"{name} is not valid JSON; send a finite number or null")


def _depth_ok(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def _text_ok(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _refuse_surrogates() -> InvalidRequestError:
    return InvalidRequestError("the JSON body has text with a lone UTF-16 surrogate (such as \"\\ud800\"), which "
                               "is not Unicode text; send valid UTF-8 (pair surrogates or drop them)")


def loads_bounded(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON from another party: bounded depth and numbers, storable text; InvalidRequestError otherwise."""
    try:
        obj = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_constant)
    except CocoonError:
        raise
    except RecursionError:
        raise InvalidRequestError(f"the JSON body is nested too deeply (at most {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON ({exc}); send a JSON object") from None
    if not _depth_ok(obj, max_depth):
        raise InvalidRequestError(f"the JSON body is nested more than {max_depth} levels deep; flatten it")
    raw_b = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if (b"\\ud" in raw_b or b"\\uD" in raw_b) and not _text_ok(obj):
        raise _refuse_surrogates()
    return obj


def check_args(body: bytes, args: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """The hot path's version for already-parsed call arguments: two byte scans for ordinary bodies."""
    if body.count(b"[") + body.count(b"{") > max_depth and not _depth_ok(args, max_depth):
        raise InvalidRequestError(f"the arguments are nested more than {max_depth} levels deep; flatten them")
    if (b"\\ud" in body or b"\\uD" in body) and not _text_ok(args):
        raise _refuse_surrogates()
    if b"NaN" in body or b"Infinity" in body or b"e999" in body.lower():
        _finite_or_refuse(args)


def _finite_or_refuse(obj: Any) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and (item != item or item in (float("inf"), float("-inf"))):
            raise InvalidRequestError("the arguments hold NaN or Infinity, which JSON cannot carry; send finite "
                                      "numbers")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class BodyLimit:
    """ASGI wrapper: every request body is at most ``limit_for(path)`` bytes, declared or streamed."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    await _answer(send, InvalidRequestError("Content-Length is not a number; send the body's "
                                                            "length in bytes"))
                    return
                if size > limit:
                    await _answer(send, too_large(limit, size))
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, limited, send)


async def _answer(send: Send, exc: CocoonError) -> None:
    body = json.dumps(exc.to_dict(), separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

"""Bounded JSON and the one body limit (gateway/limits.py), without a server."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cocoon_faas.errors import InvalidRequestError, PayloadTooLargeError
from cocoon_faas.gateway.limits import BodyLimit, check_args, loads_bounded


@pytest.mark.parametrize(("raw", "needle"), [
    (b"[" * 65 + b"]" * 65, "nested more than 64"),
    (b"[" * 50_000 + b"]" * 50_000, "nested"),
    (b'{"a": ' + b"1" * 41 + b"}", "41 digits"),
    (b'{"a": 1e999}', "finite"),
    (b'{"a": -Infinity}', "Infinity"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": "\\ud800"}', "surrogate"),
    (b'{"a": "\\uDFFF"}', "surrogate"),
    (b"{bad", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_loads_bounded_refuses_by_name(raw: bytes, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        loads_bounded(raw)
    assert needle in exc.value.message


def test_loads_bounded_keeps_ordinary_json() -> None:
    assert loads_bounded(b"[" * 64 + b"]" * 64) is not None
    assert loads_bounded(b'{"a": "\\ud83d\\ude00", "n": ' + b"9" * 40 + b', "f": 1.5e300}') == {
        "a": "\U0001F600", "n": int("9" * 40), "f": 1.5e300}


def test_check_args_on_the_hot_path() -> None:
    check_args(b'{"a": [1, 2, {"b": 3}]}', {"a": [1, 2, {"b": 3}]})
    deep: object = 1
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="nested"):
        check_args(b"[" * 70, deep)
    with pytest.raises(InvalidRequestError, match="surrogate"):
        check_args(b'{"a": "\\ud800"}', {"a": "\ud800"})
    with pytest.raises(InvalidRequestError, match="NaN"):
        check_args(b'{"a": NaN}', {"a": float("nan")})


async def _echo(request: Request) -> JSONResponse:
    try:
        return JSONResponse({"n": len(await request.body())})
    except PayloadTooLargeError as exc:
        return JSONResponse(exc.to_dict(), exc.status)


def test_body_limit_declared_and_streamed() -> None:
    app = BodyLimit(Starlette(routes=[Route("/x", _echo, methods=["POST"])]), lambda path: 100)
    with TestClient(app) as c:
        assert c.post("/x", content=b"a" * 100).json() == {"n": 100}
        declared = c.post("/x", content=b"a" * 101)
        assert declared.status_code == 413 and "101 bytes" in declared.json()["error"]["message"]
        streamed = c.post("/x", content=iter([b"a" * 60, b"a" * 60]))
        assert streamed.status_code == 413 and streamed.json()["error"]["limit"] == 100
        bad = c.post("/x", content=b"a", headers={"content-length": "x"})
        assert bad.status_code == 400

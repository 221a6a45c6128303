"""`cocoon proxy`'s app without a gateway: bad requests are the client's (400 naming the field, as the gateway
answers them) and cost no round trip; `models.retrieve` of the official clients works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cocoon_faas.proxy import Proxy, create_proxy_app
from cocoon_faas.transport import Transport
from tests.conftest import free_port

MSGS = [{"role": "user", "content": "hi"}]


class _Served(Proxy):
    """The gateway's model table, as if fetched (the only thing these requests may ask of it)."""

    def models(self, refresh: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
        # a function taking none of the options a request may ask for (n, logprobs, response_format...)
        return {("chat", "m"): {"function": "chat", "kind": "chat", "measurement": "00" * 32, "accepts": []}}


@pytest.fixture
def client(tmp_path: Path) -> Any:
    t = Transport(f"http://127.0.0.1:{free_port()}", None, timeout=2)  # nothing listens: a request would fail
    with TestClient(create_proxy_app(_Served(t, tmp_path))) as c:
        yield c
    t.close()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "n": 2}, "n"),  # the function takes no n
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "logprobs": True}, "logprobs"),  # nor logprobs
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "n": 17}, "n"),
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "top_logprobs": 21, "logprobs": True},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "stream": "true"}, "stream"),
    ("/v1/chat/completions", {"model": "m", "messages": MSGS, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/completions", {"model": "m", "prompt": [1, 2]}, "prompt"),
    ("/v1/embeddings", {"model": "e", "input": ""}, "input"),
])
def test_bad_requests_are_400_naming_the_field(client: Any, path: str, body: dict[str, Any], param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text  # was 500 "request body is not valid JSON" (OpenAI clients retry a 500)
    assert r.json()["error"]["type"] == "invalid_request" and r.json()["error"]["param"] == param


def test_a_body_that_is_not_json_is_400(client: Any) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text


def test_models_retrieve(client: Any) -> None:
    r = client.get("/v1/models/m")
    assert r.status_code == 200 and r.json()["id"] == "m" and r.json()["cocoon"]["function"] == "chat", r.text
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found", missing.text


def test_without_trust_on_first_use_the_error_names_a_fix_that_exists(tmp_path: Path) -> None:
    from cocoon_faas.errors import NotFoundError

    t = Transport(f"http://127.0.0.1:{free_port()}", None, timeout=2)
    try:
        with pytest.raises(NotFoundError, match="cocoon deploy") as err:
            Proxy(t, tmp_path, tofu=False).policy({"function": "chat", "measurement": "00" * 32})
        assert "--measurement" not in str(err.value)  # `cocoon proxy` has no such flag
    finally:
        t.close()


def test_a_sealed_refusal_of_the_input_is_a_400_so_clients_do_not_retry_it(tmp_path: Path) -> None:
    from collections.abc import Iterator

    from cocoon_faas.errors import FunctionError

    class Refusing(_Served):
        def sealed(self, path: str, info: dict[str, Any], args: dict[str, Any]) -> Iterator[Any]:
            raise FunctionError("InvalidRequestError: prompt (20031 tokens) exceeds the model's context",
                                exception_type="InvalidRequestError")
            yield  # a generator, as the real one

    t = Transport(f"http://127.0.0.1:{free_port()}", None, timeout=2)
    with TestClient(create_proxy_app(Refusing(t, tmp_path))) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": MSGS})
    t.close()
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text  # was 500
    assert "exceeds the model's context" in r.json()["error"]["message"]

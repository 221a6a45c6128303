"""OpenAI-compatible endpoints, driven by the official `openai` client against a real gateway."""

from __future__ import annotations

import base64
import math
import struct
import time

import httpx
import pytest

from tests.conftest import ROOT

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e


def _warm(gateway, path: str, body: dict, give_up_s: float = 420) -> None:
    """The first call starts the function's first replica (both scale from zero), which on a fresh clone also
    converts the model into the cache: minutes on two busy cores, past one call's wait for a replica (120 s). The
    tests here are about the API, not cold starts: call until a replica answers."""
    deadline = time.monotonic() + give_up_s
    with httpx.Client(base_url=gateway.url, headers=gateway.headers(), timeout=200) as c:
        while True:
            r = c.post(path, json=body)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 503 and r.json()["error"]["type"] == "no_capacity", r.text
            time.sleep(1)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def oa(gateway):
    gateway.cli("deploy", str(ROOT / "examples" / "embeddings.py"), timeout=300)
    gateway.cli("deploy", str(ROOT / "examples" / "chat.py"), timeout=300)
    _warm(gateway, "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "warm up"})
    _warm(gateway, "/v1/chat/completions", {"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "Warm up."}]})
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=120)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_models_lists_served_models(oa):
    ids = {m.id for m in oa.models.list().data}
    assert {"all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"} <= ids


def test_embeddings_match_the_model_run_locally(oa):
    from cocoon_faas.kernels.models.minilm import MiniLM

    texts = ["Confidential compute on TON", "a", "GPU providers earn per call"]
    r = oa.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert [d.index for d in r.data] == [0, 1, 2] and len(r.data[0].embedding) == 384
    local = MiniLM.load().embed(texts).tolist()
    for d, ref in zip(r.data, local, strict=True):
        assert _cos(d.embedding, ref) >= 0.9999
    assert r.usage.prompt_tokens == sum(MiniLM.load().count_tokens(texts))
    b64 = oa.embeddings.create(model="all-MiniLM-L6-v2", input="a", encoding_format="base64").data[0].embedding
    if isinstance(b64, str):  # asked for explicitly, the client hands back the raw little-endian float32 bytes
        raw = base64.b64decode(b64)
        b64 = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert _cos(b64, local[1]) >= 0.9999


def test_chat_completion_greedy_and_streamed_agree(oa):
    msgs = [{"role": "user", "content": "Name a colour."}]
    full = oa.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 5
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(oa.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=8,
                                             temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sampling_is_reproducible_with_a_seed(oa):
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say something."}],
              max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = oa.chat.completions.create(**kw).choices[0].message.content
    b = oa.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_logprobs_and_choices_come_from_the_engine(oa):
    """logprobs/top_logprobs and n reach the engine through the OpenAI route: greedy, each chosen token is the
    likeliest of its alternatives and the tokens spell the answer; n=2 gives two choices, whole and streamed."""
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
              temperature=0)
    r = oa.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob <= 0 and [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs),
                                                                                  reverse=True)
    penalized = oa.chat.completions.create(**kw, frequency_penalty=2, presence_penalty=1)  # reaches the engine
    assert penalized.choices[0].message.content and penalized.usage.completion_tokens >= 1
    forced = oa.chat.completions.create(**{**kw, "max_tokens": 3}, logprobs=True, logit_bias={"28": 100})
    assert [t.token for t in forced.choices[0].logprobs.content] == [forced.choices[0].logprobs.content[0].token] * 3
    two = oa.chat.completions.create(**{**kw, "temperature": 0.9}, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    chunks = list(oa.chat.completions.create(**{**kw, "temperature": 0.9}, n=2, seed=3, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in (0, 1)]
    assert streamed == [c.message.content for c in two.choices]  # the same seed: the same two answers


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tool_calls_through_the_official_client(oa):
    """tools on the engine-backed chat function: the grammar makes the call parse and fit the tool's schema; the
    client reads it as `tool_calls`, whole and streamed; the loop's next turn (the tool's result) is answered."""
    import json

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="SmolLM2-135M-Instruct", max_tokens=40, temperature=0, tools=[WEATHER])
    r = oa.chat.completions.create(messages=msgs, tool_choice="required", **kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    chunks = list(oa.chat.completions.create(messages=msgs, tool_choice="required", stream=True, **kw))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [(call.function.name,
                                                                            call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    auto = oa.chat.completions.create(messages=msgs, **kw).choices[0]  # the model may call or answer in words
    assert auto.message.tool_calls or auto.message.content
    then = oa.chat.completions.create(messages=[*msgs, r.choices[0].message.model_dump(exclude_none=True),
                                                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}],
                                      tool_choice="none", **kw)
    assert then.choices[0].message.content and not then.choices[0].message.tool_calls


def test_the_chat_function_bounds_what_a_call_it_cannot_see_asks_for(gateway, oa):
    """A sealed call reaches the function unread by the gateway, so examples/chat.py itself refuses more completion
    tokens than a per-token hold covers (the gateway refuses them on the OpenAI route): a 400, nothing charged."""
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4000}
    r = httpx.post(gateway.url + "/fn/Chat.generate", json=body, headers=gateway.headers(), timeout=60)
    assert r.status_code == 400 and "lower max_tokens or n" in r.json()["error"]["message"], r.text
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", **body},
                   headers=gateway.headers(), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"functions": [{"name": "f"}]}, "'functions' is not supported"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"prediction": {"type": "content", "content": "x"}}, "'prediction' is not supported"),
        ({"audio": {"voice": "x"}}, "'audio' is not supported"),
        ({"temperature": 3}, "temperature"),
        ({"model": "gpt-9"}, "no deployed function serves chat model 'gpt-9'"),
    ],
)
def test_unsupported_fields_get_a_clear_400(gateway, oa, body, needle):
    req = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=req, headers=gateway.headers(), timeout=30)
    assert r.status_code in (400, 404) and needle in r.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError):
        oa.chat.completions.create(**req)


def test_json_schema_response_format_and_cached_tokens(oa):
    """response_format reaches the engine: the output parses and validates; a repeated system prompt is served
    from the prefix cache and reported as cached_tokens."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
              "required": ["answer"], "additionalProperties": False}
    msgs = [{"role": "system", "content": "You answer questions about Cocoon, a network of confidential GPU "
                                          "workers paid in TON, as JSON objects."},
            {"role": "user", "content": "Who pays the providers?"}]
    kw = dict(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=40, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    first = oa.chat.completions.create(**kw)
    jsonschema.validate(json.loads(first.choices[0].message.content), schema)
    again = oa.chat.completions.create(**kw)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= 16

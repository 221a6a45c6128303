"""The OpenAI shapes shared by the gateway's routes and `cocoon proxy` (cocoon_faas/openai_compat.py): requests
checked into function arguments, and function items (which a replica controls) assembled into answers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.openai_compat import Assembler, chat_args, check_accepted, completion_args, parse_logit_bias

MSGS = [{"role": "user", "content": "hi"}]


def test_options_are_passed_only_when_asked_for() -> None:
    plain = chat_args({"model": "m", "messages": MSGS})
    assert not {"n", "logprobs", "top_logprobs", "response_format", "presence_penalty",
                "frequency_penalty"} & set(plain)  # any chat function serves it
    zero = chat_args({"model": "m", "messages": MSGS, "presence_penalty": 0, "frequency_penalty": None})
    assert "presence_penalty" not in zero and "frequency_penalty" not in zero  # what some clients always send
    assert chat_args({"model": "m", "messages": MSGS, "frequency_penalty": -1})["frequency_penalty"] == -1.0
    assert chat_args({"model": "m", "messages": MSGS, "logit_bias": {"7": -100, "9": 2.5}})["logit_bias"] == {
        "7": -100.0, "9": 2.5}
    assert "logit_bias" not in chat_args({"model": "m", "messages": MSGS, "logit_bias": {}})
    with pytest.raises(InvalidRequestError, match="logit_bias"):  # from Python (an engine's caller): not a JSON key
        parse_logit_bias({-1: 5})
    asked = chat_args({"model": "m", "messages": MSGS, "n": 3, "logprobs": True, "top_logprobs": 4})
    assert (asked["n"], asked["logprobs"], asked["top_logprobs"]) == (3, True, 4)
    assert "top_logprobs" not in chat_args({"model": "m", "messages": MSGS, "logprobs": True, "n": 1})
    legacy = completion_args({"model": "m", "prompt": "p", "logprobs": 0}, as_chat=True)
    assert legacy["logprobs"] is True and "top_logprobs" not in legacy and legacy["messages"][0]["content"] == "p"


@pytest.mark.parametrize("extra,param", [
    ({"n": True}, "n"), ({"n": 17}, "n"), ({"n": 8, "max_tokens": 600}, "n"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"), ({"frequency_penalty": False}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ({"logit_bias": {"12": 101}}, "logit_bias"), ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"logit_bias": {"x": 5}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_options_name_their_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        chat_args({"model": "m", "messages": MSGS, **extra})
    assert e.value.to_dict()["error"]["param"] == param


def test_an_option_the_function_does_not_take_is_refused_by_name() -> None:
    args = chat_args({"model": "m", "messages": MSGS, "n": 2})
    check_accepted(args, ["n"], "m", "f")
    check_accepted(args, None, "m", "f")  # **kwargs (or a gateway that does not say): passed on
    with pytest.raises(InvalidRequestError, match="does not support 'n'"):
        check_accepted(args, ["logprobs", "top_logprobs"], "m", "f")


def _asm(**kw: Any) -> Assembler:
    return Assembler("m", "id", "chat", **kw)


def test_poison_items_are_left_out_never_raised() -> None:
    a = _asm(n=2, logprobs=True, top_logprobs=1)
    items: list[Any] = [
        None, 5, "text", [1], {"delta": 7}, {"index": 2, "delta": "out of range"}, {"index": True, "delta": "bool"},
        {"index": "1", "delta": "str"}, {"index": -1, "delta": "neg"},
        {"delta": "a", "logprobs": {"token": "a", "logprob": float("nan")}},  # text kept, logprobs dropped
        {"delta": "b", "logprobs": {"logprob": float("-inf"), "top_logprobs": "x"}},  # -inf: OpenAI's floor
        {"index": 1, "delta": "c", "logprobs": {"token": 3, "logprob": -1, "top_logprobs": [
            ["x", "y"], ["ok", -2.5], ["next", -3.0], None, ["z"], ["w", True]]}},
        {"finish_reasons": ["length", 9], "usage": {"prompt_tokens": 2, "completion_tokens": 3}},
    ]
    deltas = [a.take(i) for i in items]
    assert [d.text for d in deltas if d is not None] == ["a", "b", "c"]
    out = a.response()
    assert [c["message"]["content"] for c in out["choices"]] == ["ab", "c"]
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "stop"]
    assert out["choices"][0]["logprobs"]["content"] == [
        {"token": "b", "logprob": -9999.0, "bytes": [98], "top_logprobs": []}]
    assert out["choices"][1]["logprobs"]["content"] == [  # token not a string: the item's text; one alternative
        {"token": "c", "logprob": -1.0, "bytes": [99], "top_logprobs": [{"token": "ok", "logprob": -2.5,
                                                                          "bytes": [111, 107]}]}]
    assert out["usage"]["completion_tokens"] == 3


def test_logprobs_are_reported_only_when_asked_for() -> None:
    a = _asm()
    a.take({"delta": "x", "index": 0, "logprobs": {"token": "x", "logprob": -0.5}})
    assert a.response()["choices"][0]["logprobs"] is None


def test_a_stream_opens_and_closes_every_choice() -> None:
    a = _asm(n=3, include_usage=True)
    assert [c["choices"][0]["delta"] for c in a.opening()] == [{"role": "assistant", "content": ""}] * 3
    a.take({"finish_reason": "length", "index": 1})
    a.take({"finish_reason": "stop"})  # no index, no list: every choice still open
    closing = a.closing({"call_id": "id", "charge": 5})
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in closing[:3]] == [
        (0, "stop"), (1, "length"), (2, "stop")]
    assert closing[-1]["choices"] == [] and closing[-1]["usage"]["total_tokens"] == 0
    assert all(c["cocoon"]["charge"] == 5 for c in closing)


def test_completions_stream_text_offsets_run_on_across_chunks() -> None:
    a = Assembler("m", "id", "completions", logprobs=True, top_logprobs=1)
    chunks = [a.chunk(d) for d in (a.take({"delta": t, "logprobs": {"token": t, "logprob": -1.0}})
                                   for t in ("ab", "c", "def")) if d is not None]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [2], [3]]
    assert a.response()["choices"][0]["logprobs"]["text_offset"] == [0, 2, 3]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "where": {"type": "object", "properties": {
        "lat": {"type": "number"}}}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "number"}, "b": {"type": "number"}}, "additionalProperties": True}}}


def test_tools_become_a_system_message_and_the_answers_schema() -> None:
    args = chat_args({"model": "m", "messages": [{"role": "system", "content": "Be brief."}, *MSGS],
                      "tools": [WEATHER, ADD]})
    assert args["messages"][0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '"get_weather"' in args["messages"][0]["content"] and len(args["messages"]) == 2
    rf = args["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "cocoon_tool_call"
    branches = rf["json_schema"]["schema"]["anyOf"]  # "auto": a call of either tool, or words
    assert [b["properties"].get("tool", {}).get("const") for b in branches] == ["get_weather", "add", None]
    weather = branches[0]["properties"]["arguments"]
    assert weather["additionalProperties"] is False  # closed unless the tool says otherwise (it does for add)
    assert weather["properties"]["where"]["additionalProperties"] is False
    assert branches[1]["properties"]["arguments"]["additionalProperties"] is True
    named = chat_args({"model": "m", "messages": MSGS, "tools": [WEATHER, ADD],
                       "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named["response_format"]["json_schema"]["schema"]["properties"]["tool"] == {"const": "add"}
    assert named["messages"][0]["role"] == "system"  # none was sent: one is added
    required = chat_args({"model": "m", "messages": MSGS, "tools": [WEATHER], "tool_choice": "required"})
    assert "content" not in json.dumps(required["response_format"])
    none = chat_args({"model": "m", "messages": MSGS, "tools": [WEATHER], "tool_choice": "none"})
    assert "response_format" not in none and none["messages"] == MSGS


def test_an_agent_loops_earlier_turns_are_rewritten_into_plain_roles() -> None:
    msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    args = chat_args({"model": "m", "messages": msgs, "tools": [WEATHER]})
    assert args["messages"][2:] == [
        {"role": "assistant", "content": '{"tool":"get_weather","arguments":{"city":"Paris"}}'},
        {"role": "user", "content": "The tool call call_1 returned: sunny"}]


@pytest.mark.parametrize("extra,param", [
    ({"tools": {"a": 1}}, "tools"), ({"tools": []}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages"),
    ({"functions": [{"name": "f"}]}, "functions"),  # the deprecated form: named, not silently ignored
])
def test_bad_tool_requests_name_their_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        chat_args({"model": "m", "messages": MSGS, **extra})
    assert e.value.to_dict()["error"]["param"] == param


def test_a_function_without_response_format_cannot_call_tools() -> None:
    args = chat_args({"model": "m", "messages": MSGS, "tools": [WEATHER]})
    with pytest.raises(InvalidRequestError) as e:
        check_accepted(args, [], "m", "f")
    assert e.value.to_dict()["error"]["param"] == "tools" and "cannot call tools" in e.value.message


def _tools_asm(choice: Any = None, **kw: Any) -> Assembler:
    body = {"model": "m", "messages": MSGS, "tools": [WEATHER, ADD], **({"tool_choice": choice} if choice else {})}
    return Assembler.for_request("m", "cid", "chat", False, body, chat_args(body))


def test_answers_are_read_back_as_tool_calls_or_words() -> None:
    a = _tools_asm()
    for piece in ('{"tool":"get_weather",', '"arguments":{"city":"Paris"}}'):
        assert a.take({"delta": piece}) is None  # nothing streams before the answer is whole
    a.take({"finish_reason": "stop"})
    choice = a.response()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "call_cid_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    words = _tools_asm()
    words.take({"delta": '{"content": "It is sunny."}', "finish_reason": "stop"})
    assert words.response()["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}
    for text in ('{"tool":"get_weather","argu', '{"tool": "rm_rf", "arguments": {}}', '[1]'):
        cut = _tools_asm()  # cut by max_tokens, a tool nobody offered, not an object: handed back as words
        cut.take({"delta": text, "finish_reason": "length"})
        choice = cut.response()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "length"
    required = _tools_asm("required")
    required.take({"delta": '{"content": "no"}', "finish_reason": "stop"})  # words were not allowed
    assert required.response()["choices"][0]["message"]["content"] == '{"content": "no"}'


def test_a_streamed_tool_call_comes_whole_before_its_finish() -> None:
    a = _tools_asm()
    a.take({"delta": '{"tool":"add","arguments":{"a":1,"b":2}}'})
    a.take({"finish_reason": "stop"})
    call, finish = a.closing({"charge": 1})
    assert call["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "id": "call_cid_0", "type": "function",
                                                           "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}]}
    assert finish["choices"][0]["finish_reason"] == "tool_calls" and finish["cocoon"] == {"charge": 1}

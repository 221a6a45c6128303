"""The OpenAI shapes shared by the gateway's routes and `cocoon proxy` (cocoon_faas/openai_compat.py): requests
checked into function arguments, and function items (which a replica controls) assembled into answers."""

from __future__ import annotations

from typing import Any

import pytest

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.openai_compat import Assembler, chat_args, check_accepted, completion_args

MSGS = [{"role": "user", "content": "hi"}]


def test_options_are_passed_only_when_asked_for() -> None:
    plain = chat_args({"model": "m", "messages": MSGS})
    assert not {"n", "logprobs", "top_logprobs", "response_format"} & set(plain)  # any chat function serves it
    asked = chat_args({"model": "m", "messages": MSGS, "n": 3, "logprobs": True, "top_logprobs": 4})
    assert (asked["n"], asked["logprobs"], asked["top_logprobs"]) == (3, True, 4)
    assert "top_logprobs" not in chat_args({"model": "m", "messages": MSGS, "logprobs": True, "n": 1})
    legacy = completion_args({"model": "m", "prompt": "p", "logprobs": 0}, as_chat=True)
    assert legacy["logprobs"] is True and "top_logprobs" not in legacy and legacy["messages"][0]["content"] == "p"


@pytest.mark.parametrize("extra,param", [
    ({"n": True}, "n"), ({"n": 17}, "n"), ({"n": 8, "max_tokens": 600}, "n"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
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

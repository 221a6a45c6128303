"""The OpenAI API's shapes, as pure functions: request bodies checked into function arguments, function output
assembled into responses. The gateway's OpenAI routes and `cocoon proxy` (which seals the arguments on the
caller's machine and assembles the answer there) use the same code, so both accept and answer exactly alike.

Calling conventions of functions that declare `serves=`:

- `chat:<model>`: a generator called as `{"messages", "max_tokens", "temperature", "top_p", "seed", "stop"}` that
  yields `{"delta": str}` items and lastly `{"finish_reason": "stop"|"length", "usage": {"prompt_tokens",
  "completion_tokens"[, "cached_tokens"]}}`. Options a request asks for are passed only then, so a function that
  takes none of them still serves every request that asks for none (one that asks for an option the function does
  not take is refused with a 400 before anything runs or is held): `"response_format"` (json_object/json_schema
  output), `"n"` (choices, > 1; items then carry `"index"` and the last one `"finish_reasons"`, one per choice),
  `"logprobs": true` and `"top_logprobs"` (items then carry `"logprobs": {"token": str, "logprob": float,
  "top_logprobs": [[token, logprob], ...]}` for the token they add), `"presence_penalty"` and
  `"frequency_penalty"` (non-zero), `"logit_bias"` ({"<token id>": bias}). `examples/chat.py` does all of these.
  A request with `tools` reaches the function as a system message and a `"response_format"`
  (cocoon_faas/openai_tools.py).
- `completions:<model>`: the same, called with `"prompt": str` instead of `"messages"`. A model served only as
  `chat:` answers /v1/completions too, with the prompt as one user message.
- `embeddings:<model>`: called once per input as `{"text": str}`, returns `{"embedding": [float], "tokens": int}`.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.openai_tools import SCHEMA_NAME, ToolPlan, rewrite_message
from cocoon_faas.pricing import HOLD_COMPLETION_TOKENS, Usage

UNSUPPORTED_CHAT = ("functions", "function_call", "audio", "modalities", "prediction", "web_search_options")
KNOWN_CHAT = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "response_format",
              "metadata", "store", "service_tier", "logprobs", "top_logprobs", "tools", "tool_choice",
              "parallel_tool_calls", "logit_bias", *UNSUPPORTED_CHAT}
UNSUPPORTED_COMPLETION = ("echo", "best_of", "suffix")
KNOWN_COMPLETION = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                    "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs",
                    "logit_bias", *UNSUPPORTED_COMPLETION}
# Arguments a chat/completions function is passed only when a request asks for them (see the conventions above)
OPTIONAL_ARGS = ("response_format", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
                 "logit_bias")
MAX_N = 16  # choices per request (the engine's limit too)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI; /v1/completions' integer `logprobs` goes to 5
MIN_LOGPROB = -9999.0  # what OpenAI reports for a token the model gives no chance (JSON has no -Infinity)
KNOWN_EMB = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_EMBEDDING_INPUTS = 2048


# What a function declaring `serves="<kind>:<model>"` is called with (the conventions above)
CALLED_WITH = {"chat": ("messages", "max_tokens", "temperature", "top_p", "seed", "stop"),
               "completions": ("prompt", "max_tokens", "temperature", "top_p", "seed", "stop"),
               "embeddings": ("text",)}


def serves_mismatch(kind: str, params: list[tuple[str, bool]], var_kwargs: bool) -> str | None:
    """Why a function with these (name, required) parameters cannot serve `kind` models (every OpenAI call of
    it would fail inside the function); None when it can."""
    sent = CALLED_WITH.get(kind, ())
    names = {n for n, _ in params}
    missing = [] if var_kwargs else [n for n in sent if n not in names]
    if missing:
        return (f"a function serving {kind}: models is called with {', '.join(sent)}, but it has no parameter "
                f"{', '.join(map(repr, missing))}; add them (or **kwargs)")
    unsent = [n for n, required in params if required and n not in sent]
    if unsent:
        return (f"a function serving {kind}: models is called with {', '.join(sent)} only, but its parameter(s) "
                f"{', '.join(map(repr, unsent))} are required; give them defaults")
    return None


def model_of(body: Any) -> str:
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object with 'model'")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required: a model id from GET /v1/models", param="model")
    return model


MAX_LOGIT_BIAS = 300  # entries, as OpenAI


def parse_logit_bias(bias: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"<token id>": -100..100}, JSON keys being strings) -> {id: bias}; None when empty."""
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids, each mapped "
                                  "to a number from -100 to 100", param="logit_bias")
    out: dict[int, float] = {}
    for k, v in bias.items():
        key = k if isinstance(k, int) and not isinstance(k, bool) and k >= 0 else (
            int(k) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9 else None)
        if key is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise InvalidRequestError(f"logit_bias maps token ids (non-negative integers) to numbers from -100 to "
                                      f"100; {k!r}: {v!r} is not one", param="logit_bias")
        out[key] = float(v)
    return out or None


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer parameter within [lo, hi] (a bool is not one), as the OpenAI routes and the engine both bound it."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequestError(f"'{name}' must be an integer from {lo} to {hi}, got {value!r}", param=name)
    return value


def check_penalty(name: str, value: Any) -> float:
    """presence_penalty / frequency_penalty as OpenAI bounds them (None: 0)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
        raise InvalidRequestError(f"'{name}' must be a number from -2 to 2, got {value!r}", param=name)
    return float(value)


def check_completion_budget(n: Any, max_tokens: Any) -> None:
    """n choices of max_tokens each must fit the completion tokens one call is held for (their types are checked
    where they are parsed; this only bounds their product)."""
    if isinstance(n, int) and isinstance(max_tokens, int) and n * max_tokens > HOLD_COMPLETION_TOKENS:
        raise InvalidRequestError(f"n ({n}) x max_tokens ({max_tokens}) is over {HOLD_COMPLETION_TOKENS}, the "
                                  "completion tokens one request may ask for; lower max_tokens or n", param="n")


def _sampling(body: dict[str, Any], default_max: int = 256) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    if max_tokens is None:
        max_tokens = default_max
    check_int("max_tokens", max_tokens, 1, 4096)
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise InvalidRequestError("'temperature' must be between 0 and 2", param="temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidRequestError("'top_p' must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequestError("'seed' must be an integer", param="seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequestError("'stop' must be a string or up to 4 non-empty strings", param="stop")
    n = body.get("n")
    if n is None:
        n = 1
    check_int("n", n, 1, MAX_N)
    check_completion_budget(n, max_tokens)
    stream_mode(body)
    out: dict[str, Any] = {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
                           "seed": seed, "stop": stop}
    if n > 1:
        out["n"] = n
    for name in ("presence_penalty", "frequency_penalty"):
        penalty = check_penalty(name, body.get(name))
        if penalty:
            out[name] = penalty
    bias = parse_logit_bias(body.get("logit_bias"))
    if bias:
        out["logit_bias"] = {str(k): v for k, v in bias.items()}
    return out


def _logprobs(on: bool, top: int, out: dict[str, Any]) -> dict[str, Any]:
    if on:
        out["logprobs"] = True
        if top:
            out["top_logprobs"] = top
    return out


def _chat_logprobs(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise InvalidRequestError(f"'logprobs' must be true or false, got {on!r}", param="logprobs")
    top = body.get("top_logprobs")
    if top is None:
        top = 0
    check_int("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    if top and not on:
        raise InvalidRequestError("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    return _logprobs(bool(on), top, out)


def _completion_logprobs(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """/v1/completions' `logprobs`: an integer, how many of the likeliest tokens to list beside each chosen one."""
    top = body.get("logprobs")
    if top is None:
        return out
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 5:
        raise InvalidRequestError("'logprobs' must be an integer from 0 to 5 on /v1/completions (how many of the "
                                  "likeliest tokens to list beside each chosen one)", param="logprobs")
    return _logprobs(True, top, out)


def check_accepted(args: dict[str, Any], accepts: Collection[str] | None, model: str, function: str) -> None:
    """400 when the request asks for an option the serving function does not take (`accepts`: the OPTIONAL_ARGS
    it takes; None: unknown, or it takes **kwargs): the call would fail inside the function, as its own error."""
    if accepts is None:
        return
    for name in OPTIONAL_ARGS:
        if name in args and name not in accepts:
            if name == "response_format" and args[name].get("json_schema", {}).get("name") == SCHEMA_NAME:
                raise InvalidRequestError(f"model {model!r} (function {function!r}) cannot call tools: tool calls "
                                          "need a chat function that takes response_format; remove 'tools'",
                                          param="tools")
            raise InvalidRequestError(f"model {model!r} (function {function!r}) does not support '{name}'; remove "
                                      "it", param=name)


def stream_mode(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of a chat/completions body, checked as OpenAI does: a truthy string is not `true`,
    and stream_options without a stream is refused rather than ignored."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError(f"'stream' must be true or false, got {stream!r}", param="stream")
    so = body.get("stream_options")
    if so is None:
        return bool(stream), False
    if not stream:
        raise InvalidRequestError("'stream_options' is allowed only with \"stream\": true; drop it or stream",
                                  param="stream_options")
    if not isinstance(so, dict) or set(so) - {"include_usage"}:
        raise InvalidRequestError("'stream_options' supports only include_usage", param="stream_options")
    usage = so.get("include_usage", False)
    if not isinstance(usage, bool):
        raise InvalidRequestError(f"'stream_options.include_usage' must be true or false, got {usage!r}",
                                  param="stream_options")
    return True, usage


def _refuse(body: dict[str, Any], unsupported: tuple[str, ...], known: set[str]) -> None:
    for f in unsupported:
        if body.get(f) not in (None, False):
            raise InvalidRequestError(f"'{f}' is not supported by this gateway; remove it", param=f)
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {unknown}", param=unknown[0])


def chat_args(body: Any) -> dict[str, Any]:
    """A /v1/chat/completions body -> the chat function's keyword arguments (400 naming the problem)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object with 'model' and 'messages'")
    _refuse(body, UNSUPPORTED_CHAT, KNOWN_CHAT)
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema")):
        raise InvalidRequestError("response_format must be {'type': 'text' | 'json_object' | 'json_schema'}",
                                  param="response_format")
    if rf is not None and rf["type"] == "json_schema" and not (
            isinstance(rf.get("json_schema"), dict) and isinstance(rf["json_schema"].get("schema", {}), dict)):
        raise InvalidRequestError("response_format json_schema needs {'json_schema': {'name': str, 'schema': {...}}}",
                                  param="response_format")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise InvalidRequestError(f"messages[{i}] needs a role of system, developer, user, assistant or tool",
                                      param="messages")
        content = m.get("content")
        if isinstance(content, list):  # text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequestError(f"messages[{i}] has non-text content; only text is supported",
                                          param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if m["role"] == "tool" or (m["role"] == "assistant" and m.get("tool_calls") is not None):
            clean.append(rewrite_message(i, m, content if isinstance(content, str) else None))
            continue
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    tools = ToolPlan.of(body)
    if tools is not None:  # offered as a system message and enforced as the output's schema
        if rf is not None and rf["type"] != "text":
            raise InvalidRequestError("send 'tools' or a 'response_format', not both (a tool call is already a "
                                      "JSON answer)", param="response_format")
        if clean[0]["role"] == "system":
            clean[0] = {"role": "system", "content": clean[0]["content"] + "\n\n" + tools.instructions()}
        else:
            clean.insert(0, {"role": "system", "content": tools.instructions()})
        rf = {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": tools.schema()}}
    args = _chat_logprobs(body, {"messages": clean, **_sampling(body)})
    if rf is not None and rf["type"] != "text":  # passed only when set, so chat functions without it still work
        args["response_format"] = rf
    return args


def completion_args(body: Any, as_chat: bool) -> dict[str, Any]:
    """A /v1/completions body -> the function's arguments (`prompt`, or one user message for a chat model)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object with 'model' and 'prompt'")
    _refuse(body, UNSUPPORTED_COMPLETION, KNOWN_COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string (token arrays and batches are not supported)",
                                  param="prompt")
    args = _completion_logprobs(body, {"prompt": prompt, **_sampling(body, 16)})
    return prompt_as_chat(args) if as_chat else args


def prompt_as_chat(args: dict[str, Any]) -> dict[str, Any]:
    """A completion's arguments (`completion_args(..., as_chat=False)`) for a chat model: the prompt as one user
    message."""
    rest = {k: v for k, v in args.items() if k != "prompt"}
    return {"messages": [{"role": "user", "content": args["prompt"]}], **rest}


def embedding_inputs(body: Any) -> tuple[list[str], str]:
    """(inputs, encoding_format) of a /v1/embeddings body."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object with 'model' and 'input'")
    unknown = sorted(set(body) - KNOWN_EMB)
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {unknown}; supported: {sorted(KNOWN_EMB)}")
    if body.get("dimensions") is not None:
        raise InvalidRequestError("'dimensions' is not supported: the model's embedding size is fixed",
                                  param="dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise InvalidRequestError("'input' must be a string or a non-empty list of strings (token arrays are "
                                  "not supported)", param="input")
    empty = next((i for i, x in enumerate(inputs) if not x), None)
    if empty is not None:  # as OpenAI: an empty text has no embedding worth paying for
        raise InvalidRequestError(f"'input' holds an empty string (item {empty}); send non-empty text",
                                  param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} strings", param="input")
    return inputs, str(fmt)


def embeddings_response(model: str, results: list[Any], fmt: str) -> tuple[dict[str, Any], int]:
    """(the /v1/embeddings answer, prompt tokens) from the per-input results."""
    data = []
    tokens = 0
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("embedding"), list):
            raise InvalidRequestError(f"the embeddings function answered input {i} without an 'embedding' list")
        emb = r["embedding"]
        t = r.get("tokens", 0)
        tokens += t if isinstance(t, int) and not isinstance(t, bool) and t >= 0 else 0
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(emb)}f", *emb)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return ({"object": "list", "data": data, "model": model,
             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, tokens)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else (MIN_LOGPROB if v < 0 else None)


@dataclass
class Delta:
    """What one item of a function adds to one choice: text, and the logprobs of the token(s) it reports."""

    index: int
    text: str
    logprobs: list[dict[str, Any]]
    offset: int = 0  # where its first token starts among its choice's tokens (/v1/completions' text_offset)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    token_chars: int = 0  # the characters of the tokens in `logprobs`


@dataclass
class Assembler:
    """Turns a chat/completions function's items into OpenAI responses (whole, or chunk by chunk).

    `n`, `logprobs` and `top_logprobs` are the request's (`for_request`): an item naming another choice is
    dropped, and logprobs are reported only when asked for, at most `top_logprobs` alternatives each, whatever the
    function sends. Nothing a function yields makes this raise: a malformed part of an item is left out. With
    `tools` (cocoon_faas/openai_tools.py) each choice's answer is read whole, at its end: a tool call or words."""

    model: str
    call_id: str
    kind: str = "chat"  # chat | completions
    include_usage: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    usage: Usage | None = None
    choices: list[_Choice] = field(default_factory=list)
    tools: ToolPlan | None = None

    def __post_init__(self) -> None:
        self.choices = [_Choice() for _ in range(self.n)]

    @classmethod
    def for_request(cls, model: str, call_id: str, kind: str, include_usage: bool, body: dict[str, Any],
                    args: dict[str, Any]) -> Assembler:
        """The assembler for a request `body` checked into `args` (chat_args / completion_args)."""
        return cls(model, call_id, kind, include_usage, n=int(args.get("n", 1)), logprobs=bool(args.get("logprobs")),
                   top_logprobs=int(args.get("top_logprobs", 0)),
                   tools=ToolPlan.of(body) if kind == "chat" else None)

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.call_id

    def take(self, item: Any) -> Delta | None:
        """Absorb one item; what it adds to a choice (None when it adds nothing)."""
        if not isinstance(item, dict):
            return None
        u = Usage.from_json(item.get("usage"))
        if u is not None:
            self.usage = u
        index = item.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n:
            return None
        reasons = item.get("finish_reasons")
        if isinstance(reasons, list):
            for c, r in zip(self.choices, reasons, strict=False):
                if isinstance(r, str):
                    c.finish = r
        elif isinstance(item.get("finish_reason"), str):
            for i, c in enumerate(self.choices):  # one reason: its choice, or every choice still open
                if i == index if "index" in item else c.finish is None:
                    c.finish = item["finish_reason"]
        choice = self.choices[index]
        delta = item.get("delta", item.get("text"))
        text = delta if isinstance(delta, str) else ""
        entry = self._entry(item.get("logprobs"), text) if self.logprobs else None
        if text:
            choice.text.append(text)
        offset = choice.token_chars
        if entry is not None:
            choice.logprobs.append(entry)
            choice.token_chars += len(entry["token"])
        if (not text and entry is None) or self.tools is not None:  # tools: the answer is read at its end
            return None
        return Delta(index, text, [entry] if entry is not None else [], offset)

    def _entry(self, lp: Any, text: str) -> dict[str, Any] | None:
        """One token's logprobs, in the chat API's shape, from the item's {"token", "logprob", "top_logprobs"}."""
        if not isinstance(lp, dict):
            return None
        value = _finite(lp.get("logprob"))
        if value is None:
            return None
        token = lp["token"] if isinstance(lp.get("token"), str) else text
        top: list[dict[str, Any]] = []
        alts = lp.get("top_logprobs")
        for alt in alts if isinstance(alts, list) else []:
            if len(top) == self.top_logprobs:
                break
            alt_value = _finite(alt[1]) if isinstance(alt, (list, tuple)) and len(alt) == 2 else None
            if alt_value is not None and isinstance(alt[0], str):
                top.append({"token": alt[0], "logprob": alt_value, "bytes": list(alt[0].encode())})
        return {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": top}

    def _logprobs_json(self, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        offsets = []  # /v1/completions' shape: parallel lists, the alternatives as {token: logprob}
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def usage_json(self) -> dict[str, Any]:
        u = self.usage or Usage(0, 0)
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _envelope(self, choices: list[dict[str, Any]], obj: str, cocoon: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "choices": choices}
        if cocoon:
            out["cocoon"] = cocoon
        return out

    def _answer(self, i: int) -> tuple[dict[str, Any], str]:
        """(the chat message of choice i, its finish_reason): words, or (tools) a call of one."""
        c = self.choices[i]
        content: str | None = "".join(c.text)
        finish = c.finish or "stop"
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.tools is not None:
            content, call = self.tools.read(content or "")
            message["content"] = content
            if call is not None:
                message["tool_calls"] = [{"id": f"call_{self.call_id}_{i}", "type": "function",
                                          "function": {"name": call[0], "arguments": call[1]}}]
                finish = "tool_calls" if finish == "stop" else finish
        return message, finish

    def response(self, cocoon: dict[str, Any] | None = None) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            lp = self._logprobs_json(c.logprobs)
            if self.kind == "chat":
                message, finish = self._answer(i)
                choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": lp})
            else:
                choices.append({"index": i, "text": "".join(c.text), "finish_reason": c.finish or "stop",
                                "logprobs": lp})
        out = self._envelope(choices, "chat.completion" if self.kind == "chat" else "text_completion", None)
        out["usage"] = self.usage_json()
        if cocoon:
            out["cocoon"] = cocoon
        return out

    def _chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
               logprobs: dict[str, Any] | None = None, cocoon: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            obj = "text_completion"
        out = self._envelope([choice], obj, cocoon)
        if self.include_usage:
            out["usage"] = None
        return out

    def opening(self) -> list[dict[str, Any]]:
        """The chunks a stream starts with: the assistant role of each chat choice."""
        return [self._chunk(i, role=True) for i in range(self.n)] if self.kind == "chat" else []

    def chunk(self, d: Delta) -> dict[str, Any]:
        """The streamed chunk of one Delta."""
        lp = self._logprobs_json(d.logprobs, d.offset) if d.logprobs else None
        return self._chunk(d.index, d.text, logprobs=lp)

    def closing(self, cocoon: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The chunks a stream ends with: each choice's finish_reason, then (include_usage) the usage, with no
        choices; the charge and receipt (`cocoon`) ride on each."""
        out = []
        finishes = [c.finish or "stop" for c in self.choices]
        if self.tools is not None:  # each choice's whole answer, read now: its words or its call
            for i, c in enumerate(self.choices):
                message, finishes[i] = self._answer(i)
                chunk = self._chunk(i, logprobs=self._logprobs_json(c.logprobs) if c.logprobs else None)
                delta = chunk["choices"][0]["delta"]
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": 0, **message["tool_calls"][0]}]
                else:
                    delta["content"] = message["content"]
                out.append(chunk)
        out += [self._chunk(i, finish=f, cocoon=cocoon) for i, f in enumerate(finishes)]
        if self.include_usage:
            last = self._envelope([], out[0]["object"], cocoon)
            last["usage"] = self.usage_json()
            out.append(last)
        return out

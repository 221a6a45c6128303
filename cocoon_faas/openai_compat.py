"""The OpenAI API's shapes, as pure functions: request bodies checked into function arguments, function output
assembled into responses. The gateway's OpenAI routes and `cocoon proxy` (which seals the arguments on the
caller's machine and assembles the answer there) use the same code, so both accept and answer exactly alike.

Calling conventions of functions that declare `serves=`:

- `chat:<model>`: a generator called as `{"messages", "max_tokens", "temperature", "top_p", "seed", "stop"}` (plus
  `"response_format"` when a request asks for json_object/json_schema output) that yields `{"delta": str}` items and lastly `{"finish_reason": "stop"|"length", "usage": {"prompt_tokens",
  "completion_tokens"[, "cached_tokens"]}}`.
- `completions:<model>`: the same, called with `"prompt": str` instead of `"messages"`. A model served only as
  `chat:` answers /v1/completions too, with the prompt as one user message.
- `embeddings:<model>`: called once per input as `{"text": str}`, returns `{"embedding": [float], "tokens": int}`.
"""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.pricing import Usage

UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio",
                    "modalities", "logit_bias", "prediction", "parallel_tool_calls", "web_search_options")
KNOWN_CHAT = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "response_format",
              "metadata", "store", "service_tier", *UNSUPPORTED_CHAT}
UNSUPPORTED_COMPLETION = ("logprobs", "echo", "best_of", "logit_bias", "suffix")
KNOWN_COMPLETION = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                    "stream_options", "n", "user", "presence_penalty", "frequency_penalty", *UNSUPPORTED_COMPLETION}
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


def _sampling(body: dict[str, Any], default_max: int = 256) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    if max_tokens is None:
        max_tokens = default_max
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise InvalidRequestError("'max_tokens' must be an integer between 1 and 4096", param="max_tokens")
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
    if body.get("n", 1) not in (1, None):
        raise InvalidRequestError("only n=1 is supported", param="n")
    stream_mode(body)
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
            "stop": stop}


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
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise InvalidRequestError(f"messages[{i}] needs a role of system, developer, user or assistant",
                                      param="messages")
        content = m.get("content")
        if isinstance(content, list):  # text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidRequestError(f"messages[{i}] has non-text content; only text is supported",
                                          param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    args = {"messages": clean, **_sampling(body)}
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
    args = {"prompt": prompt, **_sampling(body, 16)}
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


@dataclass
class Assembler:
    """Turns a chat/completions function's items into OpenAI responses (whole, or chunk by chunk)."""

    model: str
    call_id: str
    kind: str = "chat"  # chat | completions
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    finish: str = "stop"
    usage: Usage | None = None

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.call_id

    def take(self, item: Any) -> str | None:
        """Absorb one item; the text it adds (None when it adds none)."""
        if not isinstance(item, dict):
            return None
        u = Usage.from_json(item.get("usage"))
        if u is not None:
            self.usage = u
        if isinstance(item.get("finish_reason"), str):
            self.finish = item["finish_reason"]
        delta = item.get("delta", item.get("text"))
        if isinstance(delta, str) and delta:
            self.text.append(delta)
            return delta
        return None

    def usage_json(self) -> dict[str, Any]:
        u = self.usage or Usage(0, 0)
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def response(self, cocoon: dict[str, Any] | None = None) -> dict[str, Any]:
        text = "".join(self.text)
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": self.finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": self.finish, "logprobs": None}
            obj = "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "choices": [choice], "usage": self.usage_json()}
        if cocoon:
            out["cocoon"] = cocoon
        return out

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              usage: bool = False, cocoon: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: text, the finish, or (choices empty) the usage."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            obj = "chat.completion.chunk"
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
            obj = "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "choices": [] if usage else choices}
        if self.include_usage:
            out["usage"] = self.usage_json() if usage else None
        if cocoon:
            out["cocoon"] = cocoon
        return out

"""OpenAI tool calls (`tools`, `tool_choice`) for any chat function that takes `response_format`.

The request's tools become two things the function already understands: a system message that lists them, and a
JSON schema the output must match (`response_format` json_schema; an engine-backed function enforces it with its
grammar, so even a small model's call parses and its arguments validate against the tool's schema):

- `tool_choice` "required" (or a named function): `{"tool": <name>, "arguments": {...}}`, one of the tools;
- "auto" (the default when tools are given): that, or `{"content": <text>}` to answer in words;
- "none": the tools are not offered (they still describe the conversation's earlier calls).

The answer is read back (`ToolPlan.read`) into OpenAI's `message.tool_calls` (finish_reason "tool_calls") or
`message.content`; output that is not such an object (cut by max_tokens) is handed back as plain content. Earlier
turns of an agent loop (an assistant message with `tool_calls`, a `tool` message with the result) are rewritten
into the plain roles every chat function takes. One call per answer: `parallel_tool_calls` is accepted, and one
call is what a model that may make several makes here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cocoon_faas.errors import InvalidRequestError

MAX_TOOLS = 128
SCHEMA_NAME = "cocoon_tool_call"  # the response_format's name when it carries the tools
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _bad(message: str, param: str = "tools") -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers: name -> JSON schema of the arguments, the description, and whether the model
    may answer in words instead (tool_choice "auto")."""

    tools: dict[str, tuple[dict[str, Any], str]]
    allow_text: bool

    @classmethod
    def of(cls, body: dict[str, Any]) -> ToolPlan | None:
        """The request's tools (400 naming the problem); None when it offers none (or tool_choice "none")."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        if body.get("parallel_tool_calls") not in (None, True, False):
            raise _bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
        if tools is None:
            if choice not in (None, "none"):
                raise _bad("'tool_choice' needs 'tools'", "tool_choice")
            return None
        if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
            raise _bad(f"'tools' must be a list of 1 to {MAX_TOOLS} tools")
        table: dict[str, tuple[dict[str, Any], str]] = {}
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(fn, dict):
                raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                           "{...}}}}}")
            name, params, desc = fn.get("name"), fn.get("parameters", {"type": "object"}), fn.get("description", "")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise _bad(f"tools[{i}].function.name must be 1-64 characters of a-z A-Z 0-9 _ -")
            if name in table:
                raise _bad(f"tools[{i}]: two tools are named {name!r}")
            if not isinstance(params, dict):
                raise _bad(f"tools[{i}].function.parameters must be a JSON schema object")
            if not isinstance(desc, str):
                raise _bad(f"tools[{i}].function.description must be a string")
            table[name] = (params, desc)
        if choice in (None, "auto"):
            return cls(table, True)
        if choice == "none":
            return None
        if choice == "required":
            return cls(table, False)
        named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = named.get("name") if isinstance(named, dict) else None
        if not isinstance(name, str):
            raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}", "tool_choice")
        if name not in table:
            raise _bad(f"'tool_choice' names {name!r}, which is not among the tools ({sorted(table)})", "tool_choice")
        return cls({name: table[name]}, False)

    def schema(self) -> dict[str, Any]:
        """What the answer must be: a call of one of the tools (or, "auto", words)."""
        calls: list[dict[str, Any]] = [
            {"type": "object", "properties": {"tool": {"const": name}, "arguments": _closed(params)},
             "required": ["tool", "arguments"], "additionalProperties": False}
            for name, (params, _) in self.tools.items()]
        if self.allow_text:
            calls.append({"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                          "additionalProperties": False})
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def instructions(self) -> str:
        listed = json.dumps([{"name": n, "description": d, "parameters": p} for n, (p, d) in self.tools.items()],
                            separators=(",", ":"))
        words = ', or {"content": "<your answer>"} to answer without a tool' if self.allow_text else ""
        return (f"You can call these tools (each with a JSON Schema of its arguments): {listed}\nReply with one JSON "
                f'object: {{"tool": "<tool name>", "arguments": {{...}}}} to call a tool{words}.')

    def read(self, text: str) -> tuple[str | None, tuple[str, str] | None]:
        """(content, (tool name, arguments JSON)) of an answer: one of the two is set."""
        try:
            out = json.loads(text)
        except (ValueError, RecursionError):
            return text, None
        if isinstance(out, dict):
            name, args = out.get("tool"), out.get("arguments")
            if isinstance(name, str) and name in self.tools and isinstance(args, dict):
                return None, (name, json.dumps(args, separators=(",", ":")))
            if self.allow_text and isinstance(out.get("content"), str):
                return out["content"], None
        return text, None


def _closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others unless it says otherwise (as
    llama.cpp's grammars do, and OpenAI's strict mode): an open object lets a model ramble invented arguments
    until max_tokens cuts the call."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems") else v)
           for k, v in schema.items()}
    props = schema.get("properties")
    if isinstance(props, dict):
        out["properties"] = {k: _closed(v) for k, v in props.items()}
        out.setdefault("additionalProperties", False)
    return out


def rewrite_message(i: int, m: dict[str, Any], content: str | None) -> dict[str, str]:
    """An agent loop's earlier turns in the roles every chat function takes: an assistant message's tool calls
    as the JSON the model wrote them in, a tool message's result as a user message."""
    if m["role"] == "tool":
        if content is None:
            raise _bad(f"messages[{i}] (a tool result) needs its content", "messages")
        call = m.get("tool_call_id")
        return {"role": "user", "content": f"The tool call {call} returned: {content}" if isinstance(call, str)
                else f"The tool returned: {content}"}
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise _bad(f"messages[{i}].content must be a string", "messages")
    written = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
            raise _bad(f"messages[{i}].tool_calls must be [{{'id', 'type': 'function', 'function': {{'name', "
                       "'arguments'}}}}]", "messages")
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = fn["arguments"]
        written.append(json.dumps({"tool": fn["name"], "arguments": args}, separators=(",", ":")))
    return {"role": "assistant", "content": "\n".join(([content] if content else []) + written)}

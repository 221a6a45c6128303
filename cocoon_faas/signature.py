"""Call signatures recorded at deploy, so the gateway can check arguments without ever loading user code.

At deploy the SDK turns a Python signature into a small JSON description (names, JSON types, required or not).
The gateway checks each call's JSON arguments against it and answers 400 naming the argument and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from cocoon_faas.errors import InvalidRequestError, InvalidSpecError

# JSON types the gateway can check; anything else is "any".
_PY_TO_JSON: dict[Any, str] = {
    str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
    tuple: "array", type(None): "null",
}


def _json_type(annotation: Any) -> tuple[str, bool]:
    """(JSON type, nullable) for an annotation; unknown annotations are 'any'."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any", True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            t, _ = _json_type(args[0])
            return t, nullable
        return "any", True
    if origin is not None:
        annotation = origin
    return _PY_TO_JSON.get(annotation, "any"), False


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # string | integer | number | boolean | array | object | any
    required: bool
    nullable: bool = False


@dataclass(frozen=True)
class Signature:
    """The JSON-checkable part of a function's signature."""

    params: tuple[Param, ...]
    var_kwargs: bool = False

    @classmethod
    def of(cls, fn: Any, *, skip_self: bool = False, batched: bool = False) -> Signature:
        try:
            sig = inspect.signature(fn)
            hints = typing.get_type_hints(fn)
        except (TypeError, ValueError, NameError):
            sig = inspect.signature(fn)
            hints = {}
        params: list[Param] = []
        var_kwargs = False
        items = list(sig.parameters.values())
        if skip_self and items:
            items = items[1:]
        for p in items:
            if p.kind is p.VAR_KEYWORD:
                var_kwargs = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                raise InvalidSpecError(
                    f"parameter {p.name!r} of {getattr(fn, '__name__', fn)!r} is positional-only or *args; "
                    "remote calls pass keyword arguments, so make it a normal parameter"
                )
            jtype, nullable = _json_type(hints.get(p.name, p.annotation))
            if batched:  # callers send one item; the replica gathers them into lists
                jtype, nullable = "any", True
            params.append(Param(p.name, jtype, p.default is p.empty, nullable or p.default is None))
        return cls(tuple(params), var_kwargs)

    def to_json(self) -> dict[str, Any]:
        return {
            "params": [
                {"name": p.name, "type": p.type, "required": p.required, "nullable": p.nullable} for p in self.params
            ],
            "var_kwargs": self.var_kwargs,
        }

    @classmethod
    def from_json(cls, d: Any) -> Signature:
        try:
            return cls(tuple(Param(**p) for p in d["params"]), bool(d.get("var_kwargs", False)))
        except (KeyError, TypeError) as exc:
            raise InvalidRequestError(f"malformed signature in deployment: {exc}") from None

    def check(self, function: str, args: Any) -> None:
        """Raise InvalidRequestError naming the first unknown, missing or mistyped argument."""
        if not isinstance(args, dict):
            raise InvalidRequestError(
                f"the body must be a JSON object of keyword arguments for {function!r}, "
                f"got {type(args).__name__}; send e.g. {self.example()}"
            )
        names = {p.name for p in self.params}
        if not self.var_kwargs:
            for key in args:
                if key not in names:
                    close = difflib.get_close_matches(key, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {sorted(names) or 'no arguments'}"
                    raise InvalidRequestError(f"function {function!r} takes no argument {key!r}{hint}", argument=key)
        for p in self.params:
            if p.name not in args:
                if p.required:
                    raise InvalidRequestError(
                        f"function {function!r} is missing required argument {p.name!r} ({p.type})", argument=p.name
                    )
                continue
            if not _type_ok(p, args[p.name]):
                raise InvalidRequestError(
                    f"argument {p.name!r} of {function!r} must be {_article(p.type)}"
                    f"{' or null' if p.nullable else ''}, got {_json_name(args[p.name])}",
                    argument=p.name,
                )

    def example(self) -> str:
        return "{" + ", ".join(f'"{p.name}": ...' for p in self.params if p.required) + "}"


def _type_ok(p: Param, v: Any) -> bool:
    if v is None:
        return p.nullable or p.type in ("any", "null")
    t = p.type
    if t == "any":
        return True
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return {"string": str, "boolean": bool, "array": list, "object": dict}.get(t, object) is type(v)


def _json_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__
    )


def _article(t: str) -> str:
    return f"an {t}" if t[0] in "aeiou" else f"a {t}"

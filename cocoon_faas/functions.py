"""`@cocoon.function`, `@cocoon.cls`, `@cocoon.enter`, `@cocoon.method`, `@cocoon.batched`: declare, don't act.

Decorators validate their arguments into a FunctionSpec and return a `Function` that still runs locally when
called; `.remote()`, `.stream()` and `.spawn()` go through the gateway. Nothing here does I/O at import time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from cocoon_faas.errors import InvalidSpecError
from cocoon_faas.signature import Signature
from cocoon_faas.spec import BatchSpec, FunctionSpec, make_spec

T = TypeVar("T")
_SPEC_KEYS = ("gpu", "cpu", "memory", "timeout", "retries", "max_concurrency", "min_replicas", "max_replicas",
              "price", "serves", "price_per_million_prompt_tokens", "price_per_million_completion_tokens",
              "network", "env")


def _kind_of(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    if inspect.iscoroutinefunction(fn):
        return "async"
    return "function"


class Function:
    """A deployable function: call it for a local run, `.remote(**kw)` to run it on the platform."""

    def __init__(self, raw: Callable[..., Any], spec: FunctionSpec, signature: Signature,
                 owner: type | None = None, method: str | None = None, enter: tuple[str, ...] = ()) -> None:
        self.raw = raw
        self.spec = spec
        self.signature = signature
        self.owner = owner
        self.method = method
        self.enter = enter
        functools.update_wrapper(self, raw)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner is not None:
            raise TypeError(
                f"{self.name} is a method; call it on an instance ({self.owner.__name__}().{self.method}(...)) "
                f"or remotely with {self.name}.remote(...)"
            )
        return self.raw(*args, **kwargs)

    def code_payload(self) -> dict[str, Any]:
        """What the replica unpickles: the function itself, or the class and method name."""
        if self.owner is not None:
            return {"format": 1, "kind": "method", "cls": self.owner, "method": self.method, "enter": self.enter}
        return {"format": 1, "kind": "function", "fn": self.raw}

    # -- remote ------------------------------------------------------------------------------------
    def keywords(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments named by the signature, as a local call binds them (a remote call sends JSON
        keyword arguments)."""
        if not args:
            return kwargs
        names = [p.name for p in self.signature.params]
        if len(args) > len(names):
            raise TypeError(f"{self.name} takes {len(names)} argument(s) {names}, but {len(args)} were given "
                            "positionally")
        twice = [n for n in names[:len(args)] if n in kwargs]
        if twice:
            raise TypeError(f"{self.name} got argument {twice[0]!r} both positionally and by keyword; pass it once")
        return {**dict(zip(names[:len(args)], args, strict=True)), **kwargs}

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call the deployed function through the gateway and return its result."""
        from cocoon_faas.client import default_client

        kwargs = self.keywords(args, kwargs)
        if self.spec.streams:
            return list(default_client().stream(self.name, kwargs))
        return default_client().call(self.name, kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate over a deployed generator function's items as they arrive."""
        from cocoon_faas.client import default_client

        return default_client().stream(self.name, self.keywords(args, kwargs))

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        """Start an async call; returns a `FunctionCall` with `.get()`, `.status()` and `.cancel()`."""
        from cocoon_faas.client import default_client

        return default_client().spawn(self.name, self.keywords(args, kwargs))

    def __repr__(self) -> str:
        return f"<cocoon.Function {self.name} {self.spec.kind}>"


def _spec_for(raw: Callable[..., Any], name: str, opts: dict[str, Any], skip_self: bool) -> tuple[FunctionSpec, Signature]:
    batch: BatchSpec | None = getattr(raw, "__cocoon_batch__", None)
    kind = _kind_of(raw)
    if batch is not None and kind not in ("function", "async"):
        raise InvalidSpecError(f"@cocoon.batched cannot wrap generator {name!r}; batch a plain or async function")
    spec = make_spec(name=name, kind=kind, batch=batch, **opts)
    if batch is not None and spec.max_concurrency < batch.max_batch_size:
        spec = spec.with_(max_concurrency=batch.max_batch_size)  # a batch needs that many calls in flight
    sig = Signature.of(raw, skip_self=skip_self, batched=batch is not None)
    for served in spec.serves:  # refused here, not by every OpenAI call failing inside the function
        # imported only for serves=: `import cocoon_faas` (every CLI run, every sandbox child) stays light
        from cocoon_faas.openai_compat import serves_mismatch

        problem = serves_mismatch(served.partition(":")[0], [(p.name, p.required) for p in sig.params],
                                  sig.var_kwargs)
        if problem:
            raise InvalidSpecError(f"{name!r} declares serves={served!r}: {problem}")
    return spec, sig


def _check_opts(decorator: str, opts: dict[str, Any]) -> None:
    """Validate options when the decorator is called, before it sees the function."""
    unknown = sorted(set(opts) - set(_SPEC_KEYS) - {"name"})
    if unknown:
        raise InvalidSpecError(f"@cocoon.{decorator}() got unknown argument(s) {unknown}; known: {sorted(_SPEC_KEYS)}")
    if decorator != "method":
        make_spec(**{"name": "_", **opts})


def function(_fn: Callable[..., Any] | None = None, /, **opts: Any) -> Any:
    """Declare a deployable function: `@cocoon.function(cpu=1, memory="1Gi", timeout=30, ...)`."""
    _check_opts("function", opts)

    def wrap(raw: Callable[..., Any]) -> Function:
        if isinstance(raw, type):
            raise InvalidSpecError(
                f"@cocoon.function got class {raw.__name__}; use @cocoon.cls(...) for classes with a setup hook"
            )
        if not callable(raw):
            raise InvalidSpecError(f"@cocoon.function needs a function, got {type(raw).__name__}")
        spec, sig = _spec_for(raw, opts.get("name") or raw.__name__, {k: v for k, v in opts.items() if k != "name"},
                              skip_self=False)
        return Function(raw, spec, sig)

    if _fn is not None:  # bare @cocoon.function
        return wrap(_fn)
    return wrap


def enter() -> Callable[[T], T]:
    """Mark a method of a `@cocoon.cls` class to run once when each replica starts (load models here)."""

    def mark(fn: T) -> T:
        fn.__cocoon_enter__ = True  # type: ignore[attr-defined]
        return fn

    return mark


def method(**opts: Any) -> Callable[[T], T]:
    """Mark a method of a `@cocoon.cls` class as an endpoint; options override the class's spec."""
    _check_opts("method", opts)

    def mark(fn: T) -> T:
        fn.__cocoon_method__ = opts  # type: ignore[attr-defined]
        return fn

    return mark


def batched(*, max_batch_size: int, wait_ms: float) -> Callable[[T], T]:
    """Gather concurrent calls into one invocation whose arguments are lists (one item per call)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 4096:
        raise InvalidSpecError(f"max_batch_size={max_batch_size!r} must be an integer between 1 and 4096")
    if isinstance(wait_ms, bool) or not isinstance(wait_ms, (int, float)) or not 0 <= wait_ms <= 60_000:
        raise InvalidSpecError(f"wait_ms={wait_ms!r} must be a number of milliseconds between 0 and 60000")

    def mark(fn: T) -> T:
        fn.__cocoon_batch__ = BatchSpec(max_batch_size, float(wait_ms))  # type: ignore[attr-defined]
        return fn

    return mark


class Cls:
    """A `@cocoon.cls` class: instantiate it for local use; `Cls.method` is a deployable Function."""

    def __init__(self, cls: type, functions: dict[str, Function]) -> None:
        self.cls = cls
        self.functions = functions
        functools.update_wrapper(self, cls, updated=())  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj = self.cls(*args, **kwargs)
        for f in self.functions.values():
            for hook in f.enter:
                getattr(obj, hook)()
            break
        return obj

    def __getattr__(self, item: str) -> Function:
        try:
            return self.__dict__["functions"][item]
        except KeyError:
            raise AttributeError(
                f"{self.cls.__name__} has no @cocoon.method {item!r}; methods: {sorted(self.functions)}"
            ) from None


def cls(**opts: Any) -> Callable[[type], Cls]:
    """Declare a class whose `@cocoon.enter` hooks run once per replica and whose `@cocoon.method`s are endpoints."""
    _check_opts("cls", opts)
    if "name" in opts and not isinstance(opts["name"], str):
        raise InvalidSpecError("name= must be a string")

    def wrap(klass: type) -> Cls:
        if not isinstance(klass, type):
            raise InvalidSpecError(f"@cocoon.cls needs a class, got {type(klass).__name__}; use @cocoon.function")
        base = opts.get("name") or klass.__name__
        enter_hooks = tuple(n for n, v in vars(klass).items() if getattr(v, "__cocoon_enter__", False))
        functions: dict[str, Function] = {}
        for attr, raw in vars(klass).items():
            mopts = getattr(raw, "__cocoon_method__", None)
            if mopts is None:
                continue
            merged = {k: v for k, v in {**opts, **mopts}.items() if k != "name"}
            spec, sig = _spec_for(raw, mopts.get("name") or f"{base}.{attr}", merged, skip_self=True)
            functions[attr] = Function(raw, spec, sig, owner=klass, method=attr, enter=enter_hooks)
        if not functions:
            raise InvalidSpecError(
                f"class {klass.__name__} has no endpoints; mark at least one method with @cocoon.method()"
            )
        return Cls(klass, functions)

    return wrap


def collect(namespace: dict[str, Any]) -> list[Function]:
    """Every deployable Function defined in a module namespace, in definition order."""
    out: list[Function] = []
    for value in namespace.values():
        if isinstance(value, Function):
            out.append(value)
        elif isinstance(value, Cls):
            out.extend(value.functions.values())
    return out

"""Turn an app file into deployable bundles: code by value (cloudpickle) plus its measurement.

The measurement is SHA-256 over the code blob followed by the canonical JSON of the spec; it names exactly what
a replica runs, and is what confidential clients pin.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from cocoon_faas.errors import CocoonError, InvalidRequestError
from cocoon_faas.functions import Cls, Function, collect


def measurement_of(blob: bytes, spec_canonical: bytes) -> str:
    return hashlib.sha256(blob + spec_canonical).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """One function ready to upload."""

    function: Function
    blob: bytes
    measurement: str

    def to_json(self) -> dict[str, Any]:
        import base64

        return {
            "name": self.function.name,
            "spec": self.function.spec.to_json(),
            "signature": self.function.signature.to_json(),
            "code": base64.b64encode(self.blob).decode(),
            "measurement": self.measurement,
        }


def load_app(path: str | Path) -> tuple[ModuleType, list[Function]]:
    """Import an app file under a private module name and collect its functions."""
    p = Path(path)
    if not p.exists():
        raise InvalidRequestError(f"{path} does not exist (from {Path.cwd()}); pass the path of your app, e.g. "
                                  "`cocoon deploy app.py`")
    if not p.is_file() or p.suffix != ".py":
        raise InvalidRequestError(f"{path} is not a Python file; pass the path of your app, e.g. `cocoon deploy app.py`")
    mod_name = f"cocoon_app_{p.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise InvalidRequestError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(p.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except CocoonError:  # a decorator refused its arguments: that error already names the fix
        sys.modules.pop(mod_name, None)
        raise
    except Exception as exc:  # the app's own code failed to import: one line naming where, not a traceback
        sys.modules.pop(mod_name, None)
        raise _import_failed(p, exc) from None
    finally:
        sys.path.pop(0)
    _refuse_redefined(p, vars(module))
    functions = collect(vars(module))
    if not functions:
        raise InvalidRequestError(
            f"{path} defines no functions to deploy; decorate one with @cocoon.function() or @cocoon.cls()"
        )
    names = [f.name for f in functions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"{path} defines function name(s) {dupes} twice; give each a distinct name=")
    cloudpickle.register_pickle_by_value(module)  # workers need not have the app installed
    return module, functions


def _refuse_redefined(path: Path, namespace: dict[str, Any]) -> None:
    """Two top-level `def f` (or classes) in one app: the second silently replaced the first, so one function
    would not deploy without a word. Refused when the surviving name is a deployable function."""
    lines: dict[str, list[int]] = {}
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines.setdefault(node.name, []).append(node.lineno)
    for name, at in lines.items():
        if len(at) > 1 and isinstance(namespace.get(name), (Function, Cls)):
            raise InvalidRequestError(
                f"{path.name} defines {name!r} {len(at)} times (lines {', '.join(map(str, at))}); each definition "
                "replaces the one before, so only the last would deploy: give each its own Python name")


def _import_failed(path: Path, exc: Exception) -> InvalidRequestError:
    """What `cocoon deploy` says when importing the app raised (it imports the app on the deploying machine)."""
    if isinstance(exc, SyntaxError):
        return InvalidRequestError(f"{path.name} line {exc.lineno}: SyntaxError: {exc.msg}; fix it and deploy again")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return InvalidRequestError(
            f"{path.name} imports {exc.name!r}, which is not installed here: `cocoon deploy` imports the app on this "
            f"machine, so install it (e.g. `pip install {exc.name.split('.')[0]}`), or import it inside the "
            "function or its @cocoon.enter() hook, which run only in the replica")
    where = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path.resolve()]
    at = f" line {where[-1].lineno}" if where else ""
    return InvalidRequestError(f"{path.name}{at}: importing the app raised {type(exc).__name__}: {exc}; "
                               "fix it and deploy again (`python " + path.name + "` shows the traceback)")


def bundle(fn: Function) -> Bundle:
    blob = cloudpickle.dumps(fn.code_payload(), protocol=5)
    return Bundle(fn, blob, measurement_of(blob, fn.spec.canonical()))

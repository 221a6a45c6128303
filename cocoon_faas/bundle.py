"""Turn an app file into deployable bundles: code by value (cloudpickle) plus its measurement.

The measurement is SHA-256 over the code blob followed by the canonical JSON of the spec; it names exactly what
a replica runs, and is what confidential clients pin.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.functions import Function, collect


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
    finally:
        sys.path.pop(0)
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


def bundle(fn: Function) -> Bundle:
    blob = cloudpickle.dumps(fn.code_payload(), protocol=5)
    return Bundle(fn, blob, measurement_of(blob, fn.spec.canonical()))

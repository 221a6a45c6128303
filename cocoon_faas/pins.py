"""What `cocoon deploy` remembers on the caller's machine: each function's measurement per gateway
(`$COCOON_HOME/deployments.json`), which confidential calls pin by default (docs/confidential.md). Kept apart from
the confidential client so a plain deploy does not load HPKE and the attestation verifiers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

DEPLOYMENTS_FILE = "deployments.json"


def record_deployment(home: Path, gateway_url: str, rec: dict[str, Any], confidential: bool = False) -> None:
    """Remember a deployed function's measurement for this gateway (atomic rewrite of deployments.json)."""
    path = Path(home) / DEPLOYMENTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault(gateway_url.rstrip("/"), {})[rec["name"]] = {
        "measurement": rec["measurement"], "version": rec.get("version"), "confidential": confidential,
        "deployed_at": int(time.time())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def pinned_measurement(home: Path, gateway_url: str, name: str) -> str | None:
    try:
        data = json.loads((Path(home) / DEPLOYMENTS_FILE).read_text())
        return str(data[gateway_url.rstrip("/")][name]["measurement"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

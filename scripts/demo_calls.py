"""Deploy every app in a folder and call each function with the arguments its module lists in DEMO_CALLS."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cocoon_faas.bundle import load_app
from cocoon_faas.client import Client


def main(folder: str) -> int:
    client = Client()
    failures = 0
    for app in sorted(Path(folder).glob("*.py")):
        print(f"\n== {app}")
        t0 = time.monotonic()
        records = client.deploy(app)
        for rec in records:
            print(f"deployed {rec['name']} v{rec['version']} -> {rec['url']} [{rec['status']}]  "
                  f"measurement {rec['measurement'][:16]}…")
        print(f"   ({time.monotonic() - t0:.1f}s)")
        module, functions = load_app(app)
        calls = getattr(module, "DEMO_CALLS", [(f.name, {}) for f in functions])
        streaming = {f.name for f in functions if f.spec.streams}
        for name, args in calls:
            t1 = time.monotonic()
            try:
                if name in streaming:
                    result = list(client.stream(name, args))
                else:
                    result = client.call(name, args)
                shown = json.dumps(result)
                print(f"POST /fn/{name} {json.dumps(args)} -> {shown[:200]}{'…' if len(shown) > 200 else ''} "
                      f"({(time.monotonic() - t1) * 1000:.0f} ms)")
            except Exception as exc:  # noqa: BLE001 - report and go on with the other examples
                expected = getattr(module, "DEMO_EXPECTED_ERRORS", {}).get(name)
                if expected and type(exc).__name__ == expected:
                    print(f"POST /fn/{name} {json.dumps(args)} -> {type(exc).__name__} (expected): {exc}")
                else:
                    failures += 1
                    print(f"POST /fn/{name} {json.dumps(args)} -> FAILED {type(exc).__name__}: {exc}")
    print(f"\n{'all example calls succeeded' if not failures else f'{failures} example call(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "examples"))

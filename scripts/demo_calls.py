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
        if "@cocoon." not in app.read_text():  # a client program (e.g. the Telegram bot), not a deployable app
            print(f"\n== {app}: not an app (no @cocoon decorators), not deployed")
            continue
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
                    if result and all(isinstance(x, dict) and ("delta" in x or "usage" in x) for x in result):
                        result = "".join(x.get("delta", "") for x in result)  # a token stream, shown as text
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
    failures += extras(client)
    print(f"\n{'all example calls succeeded' if not failures else f'{failures} example call(s) failed'}")
    return 1 if failures else 0


def extras(client: Client) -> int:
    """A sealed call (dev attestation: NOT SECURE, for this machine only) and the OpenAI-compatible endpoints."""
    import httpx

    failures = 0
    print("\n== confidential call (sealed to attested replicas; dev attestation, NOT SECURE)")
    try:
        result = client.call_confidential("greet", {"name": "sealed Ada"}, allow_dev_attestation=True)
        receipt = client.last_receipt
        print(f"greet (sealed) -> {json.dumps(result)}; receipt signed by the replica: "
              f"{getattr(receipt, 'exec_ms', '?')} ms metered")
    except Exception as exc:  # noqa: BLE001
        failures += 1
        print(f"greet (sealed) -> FAILED {type(exc).__name__}: {exc}")
    print("\n== OpenAI-compatible API")
    h = {"Authorization": f"Bearer {client.api_key}"}
    try:
        models = httpx.get(f"{client.url}/v1/models", headers=h, timeout=60).json()
        print("GET /v1/models ->", [m["id"] for m in models["data"]])
        if any(m["id"] == "all-MiniLM-L6-v2" for m in models["data"]):
            r = httpx.post(f"{client.url}/v1/embeddings", headers=h, timeout=120,
                           json={"model": "all-MiniLM-L6-v2", "input": ["hello", "world"]}).json()
            print(f"POST /v1/embeddings -> {len(r['data'])} vectors of {len(r['data'][0]['embedding'])}, "
                  f"usage {r['usage']}")
        if any(m["id"] == "SmolLM2-135M-Instruct" for m in models["data"]):
            r = httpx.post(f"{client.url}/v1/chat/completions", headers=h, timeout=300, json={
                "model": "SmolLM2-135M-Instruct", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello to TON."}]}).json()
            print(f"POST /v1/chat/completions -> {r['choices'][0]['message']['content']!r}, usage {r['usage']}")
    except Exception as exc:  # noqa: BLE001
        failures += 1
        print(f"OpenAI-compatible API -> FAILED {type(exc).__name__}: {exc}")
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "examples"))

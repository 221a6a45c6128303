"""The functions `benchmarks/sandbox.py` deploys: a no-op and a 64 KiB echo, so all cost measured is the
platform's (gateway, actor, and with the sandbox on, the relay to the sandboxed child)."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
async def noop() -> int:
    return 0


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
async def echo(data: str) -> str:
    return data

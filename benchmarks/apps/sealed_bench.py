"""Functions `benchmarks/confidential.py --gateway` deploys: a no-op and an echo, called plain and sealed."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
def bench_noop() -> int:
    return 0


@cocoon.function(cpu=0.25, max_concurrency=64, min_replicas=1, max_replicas=1)
def bench_echo(data: str) -> str:
    return data

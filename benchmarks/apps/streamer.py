"""The streaming function `benchmarks/streams.py` deploys: yields `n` items of `size` bytes as fast as it can."""

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, max_concurrency=4, min_replicas=1, max_replicas=1)
async def streamer(n: int = 100, size: int = 100):
    item = "x" * size
    for i in range(n):
        yield {"i": i, "s": item}

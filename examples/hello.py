"""The smallest app: `cocoon deploy examples/hello.py`, then `cocoon call greet '{"name": "Ada"}'`."""

import asyncio
import time

import cocoon_faas as cocoon


@cocoon.function(cpu=1, memory="1Gi", timeout=30, retries=2, max_concurrency=4, min_replicas=0, max_replicas=4)
def greet(name: str, excited: bool = False) -> dict:
    print(f"greeting {name}")
    return {"message": f"Hello, {name}{'!' if excited else '.'}"}


@cocoon.function(cpu=0.5, max_concurrency=16, timeout=10)
async def add(a: float, b: float) -> float:
    await asyncio.sleep(0)
    return a + b


@cocoon.function(cpu=0.5, timeout=30, max_concurrency=4)
def countdown(start: int = 3, delay: float = 0.05):
    """A generator: each item is streamed to the caller as soon as it is yielded."""
    for i in range(start, 0, -1):
        yield {"n": i}
        time.sleep(delay)
    yield {"n": 0, "liftoff": True}


@cocoon.function(cpu=0.5, timeout=5, max_concurrency=2)
def sleepy(seconds: float) -> dict:
    """Sleeps; used to show timeouts and cancellation."""
    time.sleep(seconds)
    return {"slept": seconds}


@cocoon.function(cpu=0.5, max_concurrency=4)
def divide(a: float, b: float) -> float:
    """Raises ZeroDivisionError for b=0: the caller gets a 500 function_error."""
    return a / b


@cocoon.cls(cpu=0.5, max_concurrency=8)
class Counter:
    """Class form: `setup` runs once per replica (load a model here); methods are endpoints."""

    @cocoon.enter()
    def setup(self) -> None:
        self.greeting = "hi"
        self.loaded_at = time.time()

    @cocoon.method()
    def hello(self, who: str = "world") -> dict:
        return {"text": f"{self.greeting} {who}", "loaded_at": self.loaded_at}


# What `bash scripts/demo` calls (name, keyword arguments).
DEMO_CALLS = [
    ("greet", {"name": "Ada", "excited": True}),
    ("add", {"a": 1.5, "b": 2}),
    ("countdown", {"start": 3}),
    ("sleepy", {"seconds": 0.1}),
    ("divide", {"a": 1, "b": 0}),
    ("Counter.hello", {"who": "Ada"}),
]
DEMO_EXPECTED_ERRORS = {"divide": "FunctionError"}

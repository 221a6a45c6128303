"""What a user writes first: a plain `def` with every setting at its default (`benchmarks/gateway.py --function
plain` serves it here and, the same code, on Ray Serve with its defaults)."""

import cocoon_faas as cocoon


@cocoon.function()
def hello(name: str = "world") -> dict:
    return {"message": f"Hello, {name}."}

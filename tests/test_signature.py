from typing import Optional

import pytest

from cocoon_faas.errors import InvalidRequestError, InvalidSpecError
from cocoon_faas.signature import Signature


def f(text: str, n: int = 1, ratio: float = 0.5, tags: Optional[list] = None, opts: dict | None = None,
      flag: bool = False, anything=None):
    pass


SIG = Signature.of(f)


def test_roundtrip_and_types():
    assert Signature.from_json(SIG.to_json()) == SIG
    types = {p.name: p.type for p in SIG.params}
    assert types == {"text": "string", "n": "integer", "ratio": "number", "tags": "array", "opts": "object",
                     "flag": "boolean", "anything": "any"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"txt": "a"}, "did you mean 'text'"),
        ({}, "missing required argument 'text'"),
        ({"text": 1}, "must be a string"),
        ({"text": "a", "n": 1.5}, "must be an integer"),
        ({"text": "a", "n": True}, "must be an integer"),
        ({"text": "a", "flag": 1}, "must be a boolean"),
        ({"text": None}, "must be a string, got null"),
        ([1], "JSON object"),
    ],
)
def test_bad_args_name_the_argument(args, needle):
    with pytest.raises(InvalidRequestError) as e:
        SIG.check("f", args)
    assert needle in str(e.value)


def test_good_args():
    SIG.check("f", {"text": "a", "n": 2, "ratio": 1, "tags": None, "opts": {}, "flag": True, "anything": [1]})


def test_positional_only_refused():
    def g(a, /):
        pass

    with pytest.raises(InvalidSpecError, match="positional-only"):
        Signature.of(g)

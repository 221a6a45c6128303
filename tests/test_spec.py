from decimal import Decimal

import pytest

import cocoon_faas as cocoon
from cocoon_faas.errors import InvalidSpecError
from cocoon_faas.spec import FunctionSpec, GpuRequest, make_spec, parse_gpu, parse_memory, parse_price


def test_decorator_builds_immutable_spec_and_still_runs_locally():
    @cocoon.function(cpu=1, memory="1Gi", timeout=30, retries=2, max_concurrency=4, min_replicas=0, max_replicas=4,
                     gpu="A100-80GB:2", price="0.0015")
    def greet(name: str, excited: bool = False) -> dict:
        return {"hello": name}

    assert greet(name="Ada") == {"hello": "Ada"}
    s = greet.spec
    assert (s.cpu, s.memory, s.timeout, s.retries, s.max_concurrency) == (1.0, 2**30, 30.0, 2, 4)
    assert s.gpu == GpuRequest("A100-80GB", 2) and s.gpu.resource == "gpu:A100-80GB"
    assert s.price == 1_500_000
    with pytest.raises(AttributeError):
        s.cpu = 2  # type: ignore[misc]
    assert FunctionSpec.from_json(s.to_json()) == s
    assert FunctionSpec.from_json(s.to_json()).canonical() == s.canonical()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gpu": "H100:x"}, 'gpu="A100-80GB:2"'),
        ({"gpu": 3}, "gpu=None for CPU only"),
        ({"memory": "1 parsec"}, "unknown unit"),
        ({"memory": "1Mi"}, "16Mi minimum"),
        ({"timeout": -1}, "between"),
        ({"retries": 1.5}, "must be an integer"),
        ({"min_replicas": 5, "max_replicas": 2}, "exceeds max_replicas"),
        ({"price": "-1"}, "non-negative"),
        ({"price": "0.0000000001"}, "at most 9 decimals"),
        ({"max_concurrency": True}, "integer"),
        ({"cpu": "two"}, "must be a number"),
    ],
)
def test_bad_arguments_raise_at_decoration_with_the_fix(kwargs, needle):
    with pytest.raises(InvalidSpecError) as e:
        cocoon.function(**kwargs)  # raises before any function is applied
    assert needle in str(e.value)


def test_unknown_argument_and_class_misuse():
    with pytest.raises(InvalidSpecError, match="unknown argument"):
        cocoon.function(gpus="H100")
    with pytest.raises(InvalidSpecError, match="use @cocoon.cls"):
        cocoon.function()(type("X", (), {}))
    with pytest.raises(InvalidSpecError, match="no endpoints"):
        cocoon.cls()(type("Y", (), {}))


def test_parsers():
    assert parse_gpu(None) is None
    assert parse_gpu("any") == GpuRequest(None, 1)
    assert parse_gpu("h100") == GpuRequest("H100", 1)
    assert parse_memory("512Mi") == 512 * 2**20 and parse_memory("2GB") == 2 * 10**9
    assert parse_price(Decimal("1.000000001")) == 1_000_000_001 and parse_price(0) == 0


def test_kinds_and_bare_decorator():
    @cocoon.function
    def plain() -> int:
        return 1

    @cocoon.function()
    async def coro() -> int:
        return 1

    @cocoon.function()
    def gen():
        yield 1

    assert (plain.spec.kind, coro.spec.kind, gen.spec.kind) == ("function", "async", "generator")
    assert gen.spec.streams and not plain.spec.streams


def test_class_form_and_batched():
    @cocoon.cls(cpu=0.5)
    class Model:
        @cocoon.enter()
        def load(self):
            self.k = 2

        @cocoon.method()
        @cocoon.batched(max_batch_size=8, wait_ms=5)
        def double(self, x: list) -> list:
            return [v * self.k for v in x]

    f = Model.double
    assert f.name == "Model.double" and f.spec.batch.max_batch_size == 8 and f.spec.max_concurrency >= 8
    assert Model().double([1, 2]) == [2, 4]  # local instance runs enter hooks
    with pytest.raises(TypeError, match="is a method"):
        f(x=[1])
    with pytest.raises(InvalidSpecError):
        cocoon.batched(max_batch_size=0, wait_ms=1)
    assert make_spec(name="a.b-c").name == "a.b-c"
    with pytest.raises(InvalidSpecError, match="not a valid function name"):
        make_spec(name="bad name")


def test_deploying_a_missing_or_non_python_path_names_the_problem(tmp_path):
    from cocoon_faas.bundle import load_app
    from cocoon_faas.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_app(tmp_path / "nope.py")
    (tmp_path / "app.txt").write_text("x = 1\n")
    with pytest.raises(InvalidRequestError, match="is not a Python file"):
        load_app(tmp_path / "app.txt")
    with pytest.raises(InvalidRequestError, match="is not a Python file"):
        load_app(tmp_path)


@pytest.mark.parametrize("source,needle", [
    ("import cocoon_faas as cocoon\n@cocoon.function()\ndef f(x:\n", "app.py line 3: SyntaxError"),
    ("import cocoon_faas as cocoon\nimport notapackage_r6\n", "imports 'notapackage_r6', which is not installed"),
    ("import cocoon_faas as cocoon\n\nraise RuntimeError('boom')\n", "app.py line 3: importing the app raised "
                                                                     "RuntimeError: boom"),
    ("import cocoon_faas as cocoon\n@cocoon.function()\ndef f(x: int) -> int:\n    return x\n\n"
     "@cocoon.function()\ndef f(x: int) -> int:\n    return x + 1\n", "defines 'f' 2 times (lines 3, 7)"),
    ("import cocoon_faas as cocoon\n@cocoon.function(memory='lots')\ndef f(x: int) -> int:\n    return x\n",
     "memory='lots' is not a size"),
], ids=["syntax", "missing-package", "raises", "redefined", "bad-spec"])
def test_deploying_a_broken_app_is_one_cli_error_line(tmp_path, monkeypatch, source, needle):
    from click.testing import CliRunner

    from cocoon_faas.cli import main

    monkeypatch.setenv("COCOON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COCOON_GATEWAY_URL", "http://127.0.0.1:9")  # never reached: the app is refused first
    (tmp_path / "app.py").write_text(source)
    r = CliRunner().invoke(main, ["deploy", str(tmp_path / "app.py")])
    assert r.exit_code == 1 and needle in r.output, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_a_served_function_must_take_what_the_openai_routes_send():
    with pytest.raises(InvalidSpecError, match="no parameter 'messages'"):  # every chat call failed inside it
        @cocoon.function(serves="chat:m")
        def chat(prompt: str) -> str:
            return prompt
    with pytest.raises(InvalidSpecError, match="'api_token' are required"):
        @cocoon.function(serves="embeddings:e")
        def embed(text: str, api_token: str) -> dict:
            return {}

    @cocoon.function(serves="chat:m")
    def ok(messages: list, **sampling) -> str:
        return ""

    @cocoon.function(serves="embeddings:e")
    def emb(text: str, normalize: bool = True) -> dict:
        return {}
    assert ok.spec.serves and emb.spec.serves

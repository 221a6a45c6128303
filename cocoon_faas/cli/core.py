"""Core commands: serve, deploy, call, ls, logs, rollback, rm, keys."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from cocoon_faas.errors import CocoonError
from cocoon_faas.settings import get_settings, reload_settings


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a CocoonError into one line on stderr and exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CocoonError as exc:
            fail(exc.message)
        except ValueError as exc:
            fail(str(exc))

    return wrapper


def client() -> Any:
    from cocoon_faas.client import Client

    return Client()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.command()
@click.option("--host", default=None, help="interface to bind (default 127.0.0.1)")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="port (default 8000)")
@click.option("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
@click.option("--workers", default=None, type=click.IntRange(1, 256),
              help="gateway processes sharing the port (default 1; with COCOON_DATABASE_URL they share PostgreSQL)")
@handles_errors
def serve(host: str | None, port: int | None, ray_address: str | None, workers: int | None) -> None:
    """Run the gateway (with a local Ray unless --ray-address / COCOON_RAY_ADDRESS)."""
    import os

    if host:
        os.environ["COCOON_HOST"] = host
    if port:
        os.environ["COCOON_PORT"] = str(port)
    if ray_address:
        os.environ["COCOON_RAY_ADDRESS"] = ray_address
    if workers:
        os.environ["COCOON_WORKERS"] = str(workers)
    settings = reload_settings()
    from cocoon_faas.gateway.server import serve as run

    click.echo(f"cocoon gateway on http://{settings.host}:{settings.port} (state in {settings.home})", err=True)
    run(settings)


@click.command()
@click.argument("app", type=click.Path(dir_okay=False))
@click.option("--confidential", is_flag=True, help="seal the code so only attested replicas can open it")
@click.option("--allow-dev-attestation", is_flag=True,
              help="with --confidential: release the code key to replicas with this machine's NOT SECURE dev key")
@handles_errors
def deploy(app: str, confidential: bool, allow_dev_attestation: bool) -> None:
    """Deploy every function in APP (a Python file); prints each URL and measurement."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    if confidential:
        from cocoon_faas.confidential_client import deploy_confidential

        if allow_dev_attestation:
            click.echo("warning: trusting development attestation: NOT SECURE, no TEE protects the code", err=True)
        records = deploy_confidential(app, allow_dev_attestation=allow_dev_attestation)
    else:
        console = Console(stderr=True)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as prog:
            tasks: dict[str, Any] = {}

            def progress(name: str, step: str) -> None:
                if name not in tasks:
                    tasks[name] = prog.add_task(f"{name}: {step}")
                prog.update(tasks[name], description=f"{name}: {step}")

            records = client().deploy(app, progress=progress)
    for rec in records:
        extra = f"  [{rec['status']}]" if rec.get("status") != "ready" else ""
        click.echo(f"✓ {rec['name']} v{rec['version']}  {rec['url']}{extra}")
        click.echo(f"  measurement {rec['measurement']}")


@click.command()
@click.argument("name")
@click.argument("args", required=False, default="{}")
@click.option("--async", "is_async", is_flag=True, help="submit and print the call id and status URL")
@click.option("--stream", is_flag=True, help="print a generator function's items as they arrive")
@click.option("--confidential", is_flag=True, help="seal the call to attested replicas (the gateway sees no data)")
@click.option("--allow-dev-attestation", is_flag=True,
              help="with --confidential: trust this machine's development attestation key (NOT SECURE)")
@click.option("--measurement", multiple=True, metavar="HEX",
              help="with --confidential: allowed measurement (default: the one `cocoon deploy` printed here)")
@handles_errors
def call(name: str, args: str, is_async: bool, stream: bool, confidential: bool, allow_dev_attestation: bool,
         measurement: tuple[str, ...]) -> None:
    """Call function NAME with ARGS, a JSON object of keyword arguments."""
    try:
        kwargs = json.loads(args)
    except ValueError as exc:
        fail(f"ARGS is not valid JSON ({exc}); pass an object like '{{\"name\": \"Ada\"}}'", 2)
    if not isinstance(kwargs, dict):
        fail("ARGS must be a JSON object of keyword arguments, like '{\"name\": \"Ada\"}'", 2)
    c = client()
    if confidential:
        _call_confidential(c, name, kwargs, is_async, stream, allow_dev_attestation, list(measurement) or None)
    elif is_async:
        fc = c.spawn(name, kwargs)
        print_json({"id": fc.id, "status_url": f"{c.url}/v1/calls/{fc.id}"})
    elif stream:
        for item in c.stream(name, kwargs):
            click.echo(json.dumps(item))
    else:
        print_json(c.call(name, kwargs))


def _call_confidential(c: Any, name: str, kwargs: dict[str, Any], is_async: bool, stream: bool, allow_dev: bool,
                       measurement: list[str] | None) -> None:
    if allow_dev:
        click.echo("warning: trusting development attestation: NOT SECURE, no TEE protects this call", err=True)
    kw = {"allow_dev_attestation": allow_dev, "measurement": measurement}
    if stream:
        for item in c.stream_confidential(name, kwargs, **kw):
            click.echo(json.dumps(item))
    elif is_async:
        print_json(c.spawn_confidential(name, kwargs, **kw).get())
    else:
        print_json(c.call_confidential(name, kwargs, **kw))


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handles_errors
def ls(as_json: bool) -> None:
    """List your functions: version, replicas, in-flight, calls, errors, p50/p99."""
    fns = client().functions()
    if as_json:
        print_json(fns)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "version", "replicas", "in-flight", "calls", "errors", "p50 ms", "p99 ms", "status")
    for f in fns:
        t.add_row(f["name"], str(f["version"]), str(f["replicas"]), str(f["in_flight"]), str(f["calls"]),
                  str(f["errors"]), _ms(f["p50_ms"]), _ms(f["p99_ms"]), f["status"])
    # A pipe gets full names (rich would cut them to 80 columns); a terminal gets its own width.
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


@click.command()
@click.argument("name")
@click.option("-n", "--limit", default=100, show_default=True, help="how many entries")
@handles_errors
def logs(name: str, limit: int) -> None:
    """Show function NAME's stdout/stderr and errors, most recent first."""
    import datetime as dt

    for e in client().logs(name, limit):
        ts = dt.datetime.fromtimestamp(e["ts"]).isoformat(timespec="seconds")
        call = (e["call_id"] or "setup")[:12]
        click.echo(f"{ts} v{e['version']} {call} {e['stream']}: {e['text'].rstrip()}")


@click.command()
@click.argument("name")
@click.argument("version", required=False, type=int)
@handles_errors
def rollback(name: str, version: int | None) -> None:
    """Make NAME run VERSION again (default: the previous version)."""
    rec = client().rollback(name, version)
    click.echo(f"✓ {rec['name']} now runs v{rec['version']} (measurement {rec['measurement']})")


@click.command()
@click.argument("name")
@handles_errors
def rm(name: str) -> None:
    """Delete function NAME and stop its replicas."""
    client().delete(name)
    click.echo(f"✓ deleted {name}")


@click.group()
def keys() -> None:
    """API keys."""


@keys.command(name="create")
@click.option("--name", required=True, help="developer name the key belongs to")
@handles_errors
def keys_create(name: str) -> None:
    """Print a new API key (and nothing else) on stdout."""
    click.echo(client().create_key(name))


@click.command()
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="port on 127.0.0.1")
@click.option("--allow-dev-attestation", is_flag=True,
              help="also trust replicas with this machine's NOT SECURE development attestation key")
@handles_errors
def proxy(port: int, allow_dev_attestation: bool) -> None:
    """An OpenAI-compatible API on 127.0.0.1 that seals every request to attested replicas, pays it from your
    channel and checks each charge: point any OpenAI client's base_url at http://127.0.0.1:PORT/v1."""
    from cocoon_faas.proxy import run_proxy

    click.echo(f"cocoon proxy on http://127.0.0.1:{port}/v1 -> {get_settings().gateway_url}", err=True)
    run_proxy(port, allow_dev_attestation)


def register(main: click.Group) -> None:
    for cmd in (serve, deploy, call, ls, logs, rollback, rm, keys, proxy):
        main.add_command(cmd)

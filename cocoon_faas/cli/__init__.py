"""The `cocoon` command: a thin layer over the public API (one module per command group)."""

from __future__ import annotations

import importlib

import click

# Each module registers its commands on `main` when imported. Add a line to add a command group.
_COMMAND_MODULES = [
    "cocoon_faas.cli.core",
    "cocoon_faas.cli.attest",
    "cocoon_faas.cli.pay",
    "cocoon_faas.cli.provider",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cocoon-faas")
def main() -> None:
    """Cocoon FaaS: confidential, pay-per-call AI functions."""
    from pydantic import ValidationError

    from cocoon_faas.settings import get_settings

    try:  # read the settings once up front, so a bad COCOON_* variable is one clear line for every command
        get_settings()
    except ValidationError as exc:
        click.echo("error: " + "; ".join(
            f"COCOON_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()), err=True)
        raise SystemExit(2) from None


for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command group not built yet
        if exc.name != _name:
            raise
        continue
    _mod.register(main)

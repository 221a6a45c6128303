"""The `cocoon` command: a thin layer over the public API (one module per command group)."""

from __future__ import annotations

import importlib

import click

# Each module registers its commands on `main` when imported; COMMANDS names the modules each top-level command
# needs, in order (`provider` is one group filled by two modules). A command's modules are imported only when that
# command runs, so `cocoon deploy` does not load the TON payment and attestation code (tests/test_cli_lazy.py
# checks this table against what the modules register).
COMMANDS: dict[str, tuple[str, ...]] = {
    **{name: ("core",) for name in ("serve", "deploy", "call", "ls", "logs", "rollback", "rm", "keys", "proxy")},
    "attest": ("attest",),
    **{name: ("pay",) for name in ("wallet", "channel", "ledger")},
    "provider": ("pay", "provider"),
}
MODULES = ("core", "attest", "pay", "provider")  # every module, in registration order (for --help)


class _LazyGroup(click.Group):
    """`cocoon`'s top-level group: commands are registered by their modules on first use."""

    _loaded: set[str]

    def _load(self, modules: tuple[str, ...]) -> None:
        loaded = self.__dict__.setdefault("_loaded", set())
        for m in modules:
            if m not in loaded:
                loaded.add(m)
                importlib.import_module(f"cocoon_faas.cli.{m}").register(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load(COMMANDS.get(cmd_name, MODULES))  # an unknown name: load all, so click can suggest one
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load(MODULES)
        return super().list_commands(ctx)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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

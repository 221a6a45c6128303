"""`cocoon` loads a command's module only when that command runs; the table saying which module registers what
must match what the modules register."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click

from cocoon_faas.cli import COMMANDS, MODULES


def test_the_command_table_matches_what_each_module_registers() -> None:
    adds: dict[str, tuple[str, ...]] = {}
    for m in MODULES:  # each module on an empty group: the top-level commands it registers
        group = click.Group()
        importlib.import_module(f"cocoon_faas.cli.{m}").register(group)
        for name in group.commands:
            adds[name] = (*adds.get(name, ()), m)
    assert adds == COMMANDS, "cocoon_faas/cli/__init__.py's COMMANDS must name, in order, every module of a command"


def test_a_command_loads_only_its_own_modules() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom cocoon_faas.cli import main\n"
            "r = CliRunner().invoke(main, ['deploy', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m.startswith(('cocoon_faas.cli.', 'cocoon_faas.ton.chain'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['cocoon_faas.cli.core']", out.stdout + out.stderr


def test_help_and_unknown_commands_see_every_command() -> None:
    from click.testing import CliRunner

    from cocoon_faas.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in r.output, name
    r = CliRunner().invoke(main, ["chanel"])
    assert r.exit_code == 2 and "channel" in r.output  # click's suggestion needs every name loaded

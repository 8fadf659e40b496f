"""``ark`` command lines parsed by the real CLI, without running them.

The systemd units (tests/test_systemd_units.py) and the deployment guide
(tests/test_deploy_guide.py) name ``ark`` commands that run elsewhere, at boot or on a
newcomer's hosts; parsing them here with click's own parser finds a renamed command, a
dropped option or a missing required one before they do.
"""

from __future__ import annotations

import click
import typer

from sandbox.ops.cli import app


def parse_with_cli(argv: list[str]) -> tuple[str, click.Context]:
    """Walk ``ark``'s command groups along ``argv`` (after the program) and parse the
    rest with the command it names, as ``ark`` itself would: click raises a UsageError
    for an unknown command or option, a bad value or a missing required option."""
    command: click.Command = typer.main.get_command(app)
    path = ["ark"]
    rest = list(argv)
    while isinstance(command, click.Group):
        if not rest:
            raise click.UsageError(f"{' '.join(path)} needs a subcommand")
        name = rest.pop(0)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            raise click.UsageError(f"{' '.join(path)} has no command {name!r}")
        command = sub
        path.append(name)
    return " ".join(path), command.make_context(" ".join(path), rest)

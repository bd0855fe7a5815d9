"""`relayctl`: one entry point for the relay, the transceiver and the local stack."""

from __future__ import annotations

import sys

import click

from voicerelay.cli import relay_cmds, stack_cmds, transceiver_cmds
from voicerelay.relay.config import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """voicerelay: stateless UDP relay + stateful WebRTC transceiver."""


for _module in (relay_cmds, transceiver_cmds, stack_cmds):
    for _command in _module.commands:
        cli.add_command(_command)


def main() -> None:
    """Console entry point: configuration errors become one line, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

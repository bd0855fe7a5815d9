"""`python -m voicerelay.agent [options]`: the same as `relayctl agent [options]`."""

from __future__ import annotations

import sys

import click

from voicerelay.cli import main as relayctl  # registers `agent`, naming env sources in errors
from voicerelay.cli.agent_cmds import agent
from voicerelay.config import ConfigError

PROG = "python -m voicerelay.agent"


def run() -> None:
    """Run the agent command; every error is one line on stderr, as relayctl's are."""
    try:
        agent.main(prog_name=PROG, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        click.echo(relayctl.usage_line(exc), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"{PROG}: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    run()

"""`relayctl`: one entry point for the relay, the transceiver and the local stack."""

from __future__ import annotations

import functools
import sys
from typing import Any

import click
from click.core import ParameterSource

from voicerelay.cli import (
    agent_cmds,
    call_cmds,
    relay_cmds,
    stack_cmds,
    token_cmds,
    transceiver_cmds,
)
from voicerelay.config import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """voicerelay: stateless UDP relay + stateful WebRTC transceiver."""


def _from_env(ctx: click.Context, param: click.Parameter) -> str | None:
    """The environment variable a parameter's value came from, if it did."""
    if param.name is None or not isinstance(param, click.Option):
        return None
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return None
    envvar = param.envvar
    return envvar if isinstance(envvar, str) else None


def _mentions(message: str, param: click.Parameter) -> bool:
    """Does an error message talk about this parameter (by option or by field name)?"""
    text = message.lower()
    names = {opt.lstrip("-") for opt in param.opts}
    if param.name:
        names |= {param.name, param.name.replace("_", " "), param.name.replace("_", "-")}
    return any(name and name in text for name in names)


def _name_env_sources(command: click.Command) -> None:
    """Make a command's ConfigError say which VOICERELAY_* variable held the wrong value."""
    callback = command.callback
    if callback is None:
        return

    @functools.wraps(callback)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ConfigError as exc:
            ctx = click.get_current_context()
            sources = [
                env
                for param in command.params
                if (env := _from_env(ctx, param)) and _mentions(str(exc), param)
            ]
            if sources:
                raise ConfigError(f"{exc} (value from {', '.join(sources)})") from None
            raise

    command.callback = wrapped


for _module in (relay_cmds, transceiver_cmds, call_cmds, stack_cmds, agent_cmds, token_cmds):
    for _command in _module.commands:
        _name_env_sources(_command)
        cli.add_command(_command)


def usage_line(exc: click.UsageError) -> str:
    """A usage error as one line: what is wrong, where it came from, where help is."""
    message = exc.format_message().strip().rstrip(".")
    ctx, param = exc.ctx, getattr(exc, "param", None)
    if ctx is not None and param is not None and (env := _from_env(ctx, param)):
        message += f" (value from {env})"
    path = ctx.command_path if ctx is not None else "relayctl"
    return f"{path}: {message}; see `{path} --help`"


def main() -> None:
    """Console entry point: every error is one line on stderr, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `relayctl` alone: the help text, as always
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(usage_line(exc), err=True)
        sys.exit(exc.exit_code)
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

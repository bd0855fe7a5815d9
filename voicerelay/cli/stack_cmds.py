"""relayctl commands (filled in by its owner)."""

import click

commands: list[click.Command] = []

"""The `igctl` command."""

from __future__ import annotations

import click

from igctl import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="igctl")
def main() -> None:
    """igctl: ask a running igd daemon for attributions."""

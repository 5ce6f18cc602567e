"""The `igd` command."""

from __future__ import annotations

import click

from igd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="igd")
def main() -> None:
    """igd: Integrated Gradients attributions for PyTorch image classifiers."""

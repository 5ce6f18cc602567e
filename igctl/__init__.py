"""igctl: the command-line client of the igd daemon (never imports torch or numpy)."""

from igd import __version__

__all__ = ["__version__"]

"""igctl: the command-line client of the igd daemon, and its Python client
(``from igctl import Client``; igctl/api.py). Never imports torch, nor numpy until arrays
are read."""

from igctl.api import Attribution, Client, ClientError, NoDaemon, RequestFailed, UntrustedSocket
from igd import __version__

__all__ = ["Attribution", "Client", "ClientError", "NoDaemon", "RequestFailed", "UntrustedSocket", "__version__"]

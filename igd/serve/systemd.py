"""systemd integration without libsystemd: sd_notify(3) and sd_listen_fds(3).

Standard library only. Outside systemd (no ``NOTIFY_SOCKET``, no ``LISTEN_FDS``) every
function here is a harmless no-op.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


class ActivationError(RuntimeError):
    """The socket systemd passed is not one igd can serve on."""


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``STOPPING=1``... to the service manager.

    Returns False when not run under a manager that listens (no ``NOTIFY_SOCKET``).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``), or None if none was passed.

    Like ``sd_listen_fds(1)``: honoured only when ``LISTEN_PID`` is this process; the
    variables are removed so children do not inherit them. igd serves one socket: more
    than one, or one that is not an AF_UNIX stream socket, is an ActivationError.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count or pid != str(os.getpid()):
        return None
    if not count.isdigit() or int(count) != 1:
        raise ActivationError(f"LISTEN_FDS={count}: igd serves exactly one socket")
    fd = SD_LISTEN_FDS_START
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ActivationError(f"fd {fd} from LISTEN_FDS is not a socket ({error})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"fd {fd} from LISTEN_FDS is {sock.family.name}/{sock.type.name}, not an AF_UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {fd} from LISTEN_FDS is not listening (use Accept=no in the .socket unit)")
    os.set_inheritable(fd, False)
    return sock

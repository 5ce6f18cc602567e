"""A Unix-socket relay, as ``socat UNIX-LISTEN:LISTEN,fork UNIX-CONNECT:UPSTREAM`` or
``ssh -L LISTEN:UPSTREAM`` make one: ``python relay.py LISTEN UPSTREAM``. Standard library
only, run as its own process: igd sees the relay as its peer, igctl sees the relay's
socket and process, and bytes pass both ways unchanged, each direction's end (EOF)
passed on as a half-close. SIGTERM ends it."""

from __future__ import annotations

import signal
import socket
import sys
import threading


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(client: socket.socket, upstream: str) -> None:
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.connect(upstream)
        back = threading.Thread(target=pump, args=(server, client), daemon=True)
        back.start()
        pump(client, server)
        back.join()


def main(listen: str, upstream: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(listen)
        listener.listen(16)
        while True:
            client, _ = listener.accept()
            threading.Thread(target=serve, args=(client, upstream), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""igd from Python: ``from igctl import Client``, for notebooks and scripts.

    from igctl import Client

    with Client() as igd:                      # the socket igctl would use
        result = igd.attribute("cat.jpg", target="tiger cat", n_steps=128)
        result.integrated_grads                # numpy (1, C, H, W), loaded when first asked for
        result.error_estimate, result.prediction
        result.save("cat.npz")

Importing this module loads neither torch nor numpy (numpy comes in when arrays are first
read). Options are the daemon's request options under their wire names (``n_steps``,
``baseline``, ``top_k``, ...; docs/protocol.md); a refusal raises :class:`RequestFailed`
with the daemon's stable ``code`` (``bad_image``, ``unknown_target``, ...).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

from igctl.client import Client as Connection
from igctl.client import ClientError, NoDaemon, RequestFailed, UntrustedSocket
from igd import request as spec
from igd.output.styles import DEFAULT_OUTLIER_PERC, DEFAULT_SIGN, DEFAULT_STYLE
from igd.protocol import default_socket_path

__all__ = ["Client", "Attribution", "ClientError", "NoDaemon", "RequestFailed", "UntrustedSocket"]

ImageLike = Union[str, "os.PathLike[str]", bytes, Any]  # a path, the file's bytes, or a PIL image
DEFAULT_TIMEOUT = 900.0


class Client:
    """A connection to igd. ``socket``: as igctl resolves it (None: ``$IGD_SOCKET``, else
    the default path); ``timeout`` seconds per request (None: none). Not thread-safe."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.socket = Path(socket) if socket is not None else default_socket_path()
        self._connection = Connection(self.socket, timeout)

    def attribute(self, image: ImageLike, target: str | int | list[str | int] | None = None,
                  **options: Any) -> Attribution:
        """Attribute ``image`` to ``target`` (a class name, an index, a list of them, or None
        for the predicted class). ``options``: the request options of docs/protocol.md
        (``n_steps=128``, ``tolerance=0.02``, ``baseline="black,white"``, ``top_k=3``, ...).
        The result file comes as npz unless ``format="torch"`` is asked for."""
        unknown = set(options) - set(spec.BY_NAME) - {"format"}
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; see docs/protocol.md")
        args = {"format": "npz", **options, "image": _image_bytes(image)}
        if target is not None:
            args["target"] = target
        return Attribution(self._connection.call("attribute", args))

    def classify(self, image: ImageLike, top: int = 5) -> list[dict[str, Any]]:
        """The ``top`` most likely classes: ``[{"index", "name", "probability"}, ...]``."""
        return list(self._connection.call("classify", {"image": _image_bytes(image), "top": top})["top"])

    def status(self) -> dict[str, Any]:
        """The daemon's status (model, queue, warm-up, ...; docs/protocol.md)."""
        return self._connection.call("status")

    def hello(self) -> dict[str, Any]:
        """The daemon's version, capabilities and model."""
        return self._connection.hello()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Attribution:
    """One attribution: its facts (``target``, ``prediction``, ``error_estimate``, ...) at
    once, and the result file's arrays by key as numpy arrays when first read
    (``result.integrated_grads``, ``result["path_logits"]``). ``data`` is the file's bytes."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.data: bytes = answer.pop("data")
        self.format: str = answer.get("format", "torch")
        self.facts = answer
        self._arrays: dict[str, Any] | None = None

    @property
    def target(self) -> str:
        return str(self.facts["target"]["name"])

    @property
    def target_index(self) -> int:
        return int(self.facts["target"]["index"])

    @property
    def prediction(self) -> str:
        return str(self.facts["prediction"]["name"])

    @property
    def probability(self) -> float:
        return float(self.facts["prediction"]["probability"])

    @property
    def error_estimate(self) -> float | None:
        return self.facts.get("error_estimate")

    @property
    def completeness_gap(self) -> float | None:
        return self.facts.get("completeness_gap")

    @property
    def convergence_delta(self) -> float:
        return float(self.facts["convergence_delta"])

    @property
    def heatmap_png(self) -> bytes | None:
        return self.facts.get("heatmap_png")

    def picture_png(self, style: str = DEFAULT_STYLE, sign: str = DEFAULT_SIGN,
                    outlier_perc: float = DEFAULT_OUTLIER_PERC, smooth: float = 0.0) -> bytes:
        """The result's picture drawn here from its arrays (igd.output.figure): with the
        defaults the same PNG bytes as the daemon's ``heatmap_png``; ``style`` "regions",
        captum's styles, ``sign``, ``outlier_perc`` and ``smooth`` as for `igctl show`."""
        from igd.output.figure import Look, figure_png  # numpy and Pillow: only now

        return figure_png(self._loaded(), Look(style, sign, outlier_perc, smooth))

    def keys(self) -> list[str]:
        return list(self._loaded())

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._loaded()[key]
        except KeyError:
            raise AttributeError(f"the result has no {key!r}; it has {', '.join(self._loaded())}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result file as igd sent it (npz, or the gzip'd torch dict)."""
        Path(path).write_bytes(self.data)

    def _loaded(self) -> dict[str, Any]:
        if self._arrays is None:
            if self.format != "npz":
                raise ValueError("arrays are read from the npz format; ask for format='npz' (the default here), "
                                 "or read the torch file with torch.load")
            from igd.output.reader import read_npz  # numpy only now: importing igctl stays numpy-free

            self._arrays = read_npz(self.data)  # checked as a file from anywhere is (UnreadableResult)
        return self._arrays

    def __repr__(self) -> str:
        estimate = self.error_estimate
        shown = "unbounded" if estimate is None else f"{estimate:.1%}"
        return (f"<Attribution {self.target!r} (prediction {self.prediction!r} {self.probability:.2f}), "
                f"{self.facts.get('n_steps')} {self.facts.get('method')} steps, estimated error {shown}>")


def _image_bytes(image: ImageLike) -> bytes:
    """The bytes of an image file: read from a path, as given, or a PIL image as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: lossless PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")

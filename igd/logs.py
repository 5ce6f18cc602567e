"""One line per event on stderr, as ``key=value`` fields (journald and grep friendly).

    ts=2026-11-27T09:01:02.345Z level=info event=request op=attribute id=3 outcome=ok ms=812
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

LOGGER = logging.getLogger("igd")


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        line = " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# A field longer than this is cut: a client's megabyte of text (an op, a target) stays out of the log.
MAX_FIELD = 256


def _value(value: Any) -> str:
    if isinstance(value, float):
        value = _plain(value)
    text = str(value)
    if len(text) > MAX_FIELD:
        text = f"{text[:MAX_FIELD]}... ({len(text):,} characters)"
    if not text or any(c in text for c in ' "=\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


def _plain(number: float) -> str:
    """A float as people and grep read it, 4 significant digits: ms=32380 (never
    3.238e+04), 812.3, 0.1235; an exponent only below 0.001 (1.5e-07)."""
    if math.isfinite(number) and abs(number) >= 1000:
        return str(round(number))
    return f"{number:.4g}"


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def log(event: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    LOGGER.log(level, event, extra={"fields": fields}, exc_info=exc_info)

"""A progress bar on stderr when it is a terminal, and nothing otherwise.

Torch-free, for igctl and `igd batch` alike; rich is imported only when a bar is
shown, so neither command pays for it at start-up.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class Progress:
    """``with Progress(total, "attributing") as advance: advance(n)``."""

    def __init__(self, total: int, label: str = "attributing") -> None:
        self.total = total
        self.label = label
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.total < 2 or not sys.stderr.isatty():
            return lambda n=1: None
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

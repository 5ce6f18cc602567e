"""Progress on stderr when it is a terminal, and nothing otherwise.

Torch-free, for igctl and `igd batch` alike; rich is imported only when a bar is
shown, so neither command pays for it at start-up.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Many items: ``with Progress(total, "attributing") as advance: advance(n)``."""

    def __init__(self, total: int, label: str = "attributing") -> None:
        self.total = total
        self.label = label
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.total < 2 or not _on_terminal():
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(console=Console(stderr=True), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


class RequestProgress:
    """One request: shows its event frames (igd's ``starting``, ``queued`` and ``progress``
    events) as a bar of path points. ``with RequestProgress(label) as on_event: ...``;
    a no-op unless stderr is a terminal. Thread-safe (rich's bars are)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not _on_terminal():
            return lambda event: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task(f"{self.label}: sent", total=None)
        return self.show

    def show(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "starting":
            self._bar.update(self._task, description=f"{self.label}: igd is starting ({event.get('phase', '')})")
        elif name == "queued":
            ahead = int(event.get("ahead", 0))
            waiting = "next in line" if ahead == 0 else f"{ahead} request{'s' * (ahead > 1)} ahead"
            self._bar.update(self._task, description=f"{self.label}: queued, {waiting}")
        elif name == "progress":
            self._bar.update(self._task, description=f"{self.label}: path points", total=event.get("total"),
                             completed=event.get("done", 0))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

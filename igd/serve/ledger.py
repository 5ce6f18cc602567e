"""The daemon's memory budget: every byte it holds for its clients, accounted.

Each request holds a :class:`Reservation` from the moment its frame's header is read
until its answer has been written out: its request frame, the answer it is expected to
produce (path points, gradients and the encoded file, estimated from n_steps and the
model's input size before anything runs), then the answer frame itself, which a client
that does not read keeps in the daemon. A large frame waits for room before its body is
read (backpressure: the client's sends block); a request whose answer does not fit is
refused at once with ``overloaded`` and the figures, and one that could not fit even in an
idle daemon with ``request_too_large`` (retrying cannot help it).

The compute worker's own working set -- the activations of one pass of ``max_batch``
path points, measured at start-up -- is held for good (:meth:`Ledger.hold_compute`):
it is memory the daemon uses for its clients' requests, one pass at a time.
Event-loop thread only.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from igd.protocol import OVERLOADED, REQUEST_TOO_LARGE
from igd.request import RequestFailed

# Frames up to this size are read even when the budget is spent (they are counted all
# the same); with the per-connection cap on outstanding requests they stay small.
SMALL_FRAME = 64 * 1024


class Ledger:
    """``limit`` bytes for all requests together; ``used`` is what they hold now."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.compute = 0  # held for good: one pass's working set
        self._freed = asyncio.Event()

    def hold_compute(self, nbytes: int) -> None:
        """Hold ``nbytes`` for the compute worker's working set from now on."""
        self._change(nbytes - self.compute)
        self.compute = nbytes

    @property
    def for_requests(self) -> int:
        """The most that requests can ever hold together: the limit less the compute share."""
        return self.limit - self.compute

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    async def room_for(self, nbytes: int) -> Reservation:
        """A reservation of ``nbytes``, waiting until they fit (small ones never wait)."""
        while nbytes > SMALL_FRAME and not self.fits(nbytes) and self.used > self.compute:  # requests hold some
            self._freed.clear()
            await self._freed.wait()
        return Reservation(self, nbytes)

    def _change(self, delta: int) -> None:
        self.used += delta
        self.peak = max(self.peak, self.used)
        if delta < 0:
            self._freed.set()

    def facts(self) -> dict[str, int]:
        return {"accounted_bytes": self.used, "limit_bytes": self.limit, "peak_accounted_bytes": self.peak,
                "compute_working_set_bytes": self.compute}


class Overbudget(Exception):
    """An answer that does not fit the memory budget now."""

    def __init__(self, needed: int, used: int, limit: int) -> None:
        super().__init__(
            f"this request needs about {needed / 2**20:,.0f} MiB and {used / 2**20:,.0f} of the "
            f"{limit / 2**20:,.0f} MiB memory budget are taken; try again shortly, or ask for fewer steps"
        )
        self.needed, self.used, self.limit = needed, used, limit


class TooLarge(Exception):
    """A request larger than the budget could ever hold for it."""

    def __init__(self, needed: int, available: int, limit: int) -> None:
        super().__init__(
            f"this request needs about {needed / 2**20:,.0f} MiB, more than the {available / 2**20:,.0f} MiB "
            f"that requests may ever hold of the {limit / 2**20:,.0f} MiB memory budget (--memory-budget); "
            "ask for fewer steps, targets or paths, a smaller image or no heatmap"
        )
        self.needed, self.available, self.limit = needed, available, limit


class Needs(Protocol):
    """What a request will hold, by part (igd.pipeline.Footprint)."""

    @property
    def total(self) -> int: ...

    def parts(self) -> dict[str, int]: ...

    def describe(self) -> str: ...


class Reservation:
    """What one request holds of the budget; :meth:`release` gives it all back."""

    def __init__(self, ledger: Ledger, nbytes: int) -> None:
        self.ledger = ledger
        self.held = 0
        self._set(nbytes)

    def expect(self, nbytes: int) -> None:
        """Add room for an answer of ``nbytes`` now; TooLarge if it could never fit beside
        what this request already holds, Overbudget if it does not fit now."""
        if self.held + nbytes > self.ledger.for_requests:
            raise TooLarge(self.held + nbytes, self.ledger.for_requests, self.ledger.limit)
        if not self.ledger.fits(nbytes):
            raise Overbudget(nbytes, self.ledger.used, self.ledger.limit)
        self._set(self.held + nbytes)

    def admit(self, needed: Needs) -> None:
        """:meth:`expect` ``needed``, refused in the request vocabulary with the figures:
        ``request_too_large`` if it could never fit, ``overloaded`` if it does not fit now."""
        details = {"needed_bytes": needed.total, "needed_by_part": needed.parts(),
                   "memory_budget_bytes": self.ledger.limit}
        try:
            self.expect(needed.total)
        except TooLarge as error:
            raise RequestFailed(REQUEST_TOO_LARGE, f"{error} ({needed.describe()})",
                                {**details, "available_bytes": error.available}) from None
        except Overbudget as error:
            raise RequestFailed(OVERLOADED, str(error), {**details, "accounted_bytes": error.used}) from None

    def settle(self, nbytes: int) -> None:
        """Hold exactly ``nbytes`` from now on (e.g. the answer frame, once built)."""
        self._set(nbytes)

    def release(self) -> None:
        self._set(0)

    def _set(self, nbytes: int) -> None:
        self.ledger._change(nbytes - self.held)
        self.held = nbytes

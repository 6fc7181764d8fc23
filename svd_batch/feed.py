"""Where a rank's units come from: claimed as late as the model allows (UnitSource: the executor, or a plain list
in tests), their rows typed as they are claimed, their images loading while the model works on the unit before."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

from .fields import Row
from .ledger import Ticket
from .plan import Plan, row_cost, with_seed


class _Inline:
    """An executor that runs each task at once: the no-overlap path shares the overlapped code."""

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


class Feed:
    """Units for one rank, claimed as late as the model allows; images load only for claimed units.

    Without lookahead a unit is claimed when the model asks for it. With lookahead (overlap on), ``arm`` is
    called as the model starts a unit, with the seconds that unit is expected to take; the next unit is claimed
    when about twice its expected image-loading time is left, so its images are ready when the model is free,
    and at the end of a run no rank sits on claimed rows while others idle. Claiming ahead never waits: at the
    end of a job only the model's own request waits for units that lost members may leave behind."""

    def __init__(self, plan: Plan, units: "UnitSource", load: Callable[[list], list[Future]],
                 *, base_seed: int, lookahead: bool):
        self.plan, self.units, self.load = plan, units, load
        self.base_seed, self.lookahead = base_seed, lookahead
        self._lock = threading.Lock()
        self._ahead: tuple | None = None
        self._exhausted = False
        self._timer: threading.Timer | None = None
        self._load_seconds: list[float] = []

    def _claim(self, wait: bool) -> tuple | None:
        if self._exhausted:
            return None
        ticket = self.units.next_unit(wait)
        if ticket is None:
            self._exhausted = wait
            return None
        table = self.plan.unit(ticket.unit)
        rows = [with_seed(Row.from_mapping(r), self.base_seed) for r in table.to_pylist()]
        t = time.perf_counter()
        futures = self.load(rows)
        if self.lookahead:
            for f in futures:
                f.add_done_callback(lambda _f, t=t: self._load_seconds.append(time.perf_counter() - t))
        return ticket, rows, futures, float(row_cost(table).sum())

    def next(self) -> tuple | None:
        """(ticket, rows, image futures, estimated cost) of the next unit, or None when this rank is done."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            item, self._ahead = self._ahead, None
            return item if item is not None else self._claim(wait=True)

    def arm(self, expected_seconds: float | None) -> None:
        if not self.lookahead or self._exhausted:
            return
        load = float(np.median(self._load_seconds[-16:])) if self._load_seconds else 0.0
        delay = 0.0 if expected_seconds is None else max(0.0, expected_seconds - 2.0 * load - 0.05)
        self._timer = threading.Timer(delay, self._claim_ahead)
        self._timer.daemon = True
        self._timer.start()

    def _claim_ahead(self) -> None:
        with self._lock:
            if self._ahead is None:
                self._ahead = self._claim(wait=False)

    def close(self) -> None:
        """Cancel the claimed-ahead unit's loads; the unit itself stays held until the rank leaves (then it is
        given back)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._ahead is not None:
                for f in self._ahead[2]:
                    f.cancel()
                self._ahead = None


class UnitSource:
    """Where a worker's units come from and go back to (the executor; tests use a plain list)."""

    def next_unit(self, wait: bool) -> Ticket | None:
        raise NotImplementedError

    def superseded(self, ticket: Ticket) -> bool:
        return False

    def finished(self, ticket: Ticket) -> None:
        pass

    def recorded(self, parts: dict[str, int], **counts: int) -> None:
        pass


class ListSource(UnitSource):
    """Units handed out from a list, for one process without a run folder protocol (tests)."""

    def __init__(self, units):
        self._it = iter(units)

    def next_unit(self, wait: bool) -> Ticket | None:
        u = next(self._it, None)
        return None if u is None else Ticket(int(u))

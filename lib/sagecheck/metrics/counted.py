"""What a backend counted it ran during one piece of work: the change of its counters and of its census of kernel calls.

A server writes both at intervals (:mod:`sagecheck.backend_stats`), so a reading waits ``settle_s`` for the last
piece's to land; the settled reading after one piece is the reading before the next (one wait per piece, not two).
10 counts each code path with it, 04 each point of its sweep.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from sagecheck import census


class Counted:
    """``counted(fn)`` runs ``fn`` and returns (its result, the counters' change, the census's change); the changes are
    empty where the backend counts nothing."""

    def __init__(self, backend: Any, settle_s: float) -> None:
        self.backend, self.settle_s = backend, settle_s
        self.last: tuple[dict[str, int] | None, dict[str, Any] | None] = (None, None)
        self.settled = False

    def _read(self) -> tuple[dict[str, int] | None, dict[str, Any] | None]:
        now, kernels = self.backend.counters(), self.backend.census()
        if (now is not None or kernels is not None) and self.settle_s:
            time.sleep(self.settle_s)
            now, kernels = self.backend.counters(), self.backend.census()
        return now, kernels

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, int], dict[str, Any]]:
        (before, census_before) = self.last if self.settled else self._read()
        try:
            out = fn()
        except BaseException:
            self.settled = False  # what the failed piece ran is in no later piece's change
            raise
        (after, census_after) = self.last = self._read()
        self.settled = True
        kernel_calls = census.difference(census_after, census_before) if census_after is not None else {}
        if before is None or after is None:
            return out, {}, kernel_calls
        return out, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}, kernel_calls

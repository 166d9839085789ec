"""Whether a CUDA graph is being captured in this process, so that a background thread does its device work only when
none is.

A capture in CUDA's global mode (torch's default, and SGLang's for its graphs) makes every potentially unsafe CUDA call
of any other thread fail, and the capture with it. The census's writer thread copies the counts of device calls to the
host (:func:`sagecheck.census.classify_pending`); on an H100 (2026-12-05) it did so while SGLang captured its prefill
graphs (``--cuda-graph-max-bs-prefill``, every extend on the kernel path: the capture runs attention eagerly between
graph segments, and the census records it) and the server died at start ("operation not permitted when stream is
capturing", then "operation failed due to a previous error during capture").

:func:`track` wraps ``torch.cuda.CUDAGraph``'s ``capture_begin`` and ``capture_end``: a capture counts itself while it
lasts, and waits to begin while another thread holds :func:`outside_capture` (whose holder's device work then finishes
first). Captures that bypass ``torch.cuda.CUDAGraph`` are not seen.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Iterator

_LOCK = threading.Lock()
_underway = 0
_TRACKED = "__sagecheck_capture_tracked__"


def underway() -> int:
    """How many captures of tracked graphs have begun and not ended."""
    return _underway


def _count(delta: int) -> None:
    global _underway
    with _LOCK:
        _underway += delta


def track(graph_class: Any = None) -> bool:
    """Wrap ``graph_class`` (``torch.cuda.CUDAGraph`` by default) once; False where there is none to wrap."""
    if graph_class is None:
        try:
            import torch

            graph_class = torch.cuda.CUDAGraph
        except (ImportError, AttributeError):
            return False
    if getattr(graph_class, _TRACKED, False):
        return True
    begin, end = graph_class.capture_begin, graph_class.capture_end

    @functools.wraps(begin)
    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        _count(+1)  # waits for a holder of outside_capture(); from here on, none begins device work
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            _count(-1)
            raise

    @functools.wraps(end)
    def capture_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return end(self, *args, **kwargs)
        finally:
            _count(-1)

    graph_class.capture_begin, graph_class.capture_end = capture_begin, capture_end
    setattr(graph_class, _TRACKED, True)
    return True


@contextmanager
def outside_capture() -> Iterator[bool]:
    """True, with no capture beginning until the block ends, where no tracked capture is underway; False at once where
    one is (the caller leaves its device work for later)."""
    with _LOCK:
        yield _underway == 0

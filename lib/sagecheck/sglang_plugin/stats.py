"""What the backend ran, written by each scheduler process (:class:`Stats`); the format and its reader are
:mod:`sagecheck.backend_stats`, where the engines and the metrics read it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# the file format's reader and the write interval live outside the plugin, for the engines and metrics to read
from sagecheck.backend_stats import (describe, expected_heads_per_rank, head_split, read, settle_s,  # noqa: F401
                                     write_interval_s)


class Stats:
    """Counters of one scheduler process; ``count`` is cheap (called per batch and per fallback)."""

    def __init__(self, folder: Path | None, config: dict[str, Any]) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()
        self.path = None if folder is None else Path(folder) / f"rank{config.get('tp_rank', 0)}-{os.getpid()}.json"
        self._dirty = threading.Event()
        self.interval_s = write_interval_s()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.write()
            threading.Thread(target=self._writer, name="sage_attn-stats", daemon=True).start()

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += int(n)
        self._dirty.set()

    def snapshot(self) -> dict[str, Any]:
        return {"config": self.config, "counts": dict(self.counts), "pid": os.getpid(), "written_at": time.time()}

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def _writer(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.interval_s)
            self._dirty.clear()
            try:
                self.write()
            except Exception as e:  # noqa: BLE001 - statistics must never take the server down, nor stop being written
                print(f"sage_attn: could not write statistics to {self.path}: {e}", file=sys.stderr, flush=True)



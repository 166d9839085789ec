"""The results contract: one JSON file per notebook, written atomically.

``outputs/<run>/results/<notebook>.json`` holds::

    {
      "schema": 3,
      "notebook": "02_logits",
      "status": "ok" | "failed" | "skipped",
      "reason": null | "why it failed or was skipped",
      "started_at": "...", "finished_at": "...",
      "params": {...}, "params_hash": "...",
      "environment": {...},
      "metrics": {"name": number | string | list | dict},
      "tables": {"name": [{column: value}, ...]},
      "verdicts": [{"id", "kind", "name", "value", "threshold", "comparison", "passed", "unit", "detail", "source"}],
      "notes": ["..."]
    }

``passed`` is computed here from value, comparison and threshold; a value that
is missing or not finite never passes. A verdict's ``id`` is stable (``"throughput.aa.prefill"``)
and its ``kind`` says what it judges (:data:`KINDS`): the recommendation, the summary and
``compare`` read ids and kinds, never the display name. A verdict's ``source`` says where its threshold comes from:
a control measured in the same run (the accepted precision, the A/A copy, the baseline's own path-to-path difference),
a published target, or a parameter; accuracy and code-path verdicts must name one (:data:`SOURCE_REQUIRED`). The
summary notebook and any later comparison across machines read only these files.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (2, 3)  # 2: verdicts without a threshold source
SUMMARY_NOTEBOOK = "99_summary"  # the notebook that summarises the others: not a measurement of its own

# what a verdict judges
KINDS = {
    "accuracy": "the candidate's answers against the baseline's",
    "code_path": "one code path of the backend against the baseline and against itself",
    "speed": "a speed figure of the candidate",
    "memory": "the candidate's memory against the baseline's",
    "kernel": "the attention kernel alone against its reference and its emulation",
    "runtime_flag": "the backend switches on and off by its parameter and fails clearly",
    "control": "the measurement itself: it can tell equal from different",
    "coverage": "how much of a sweep could be measured",
}
# kinds whose threshold must come from a control of the run or a published target, and say which
SOURCE_REQUIRED = ("accuracy", "code_path")
COMPARISONS = {
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "abs<=": lambda v, t: abs(v) <= t,
    "==": lambda v, t: v == t,
}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts only; numpy/torch scalars and NaN made portable."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # pandas DataFrame
        return to_jsonable(value.to_dict(orient="records"))
    if hasattr(value, "tolist"):  # numpy / torch
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return str(value)



def one_line(text: str, width: int = 200) -> str:
    """A verdict's detail: ``text`` on one line, cut at a word with " …" where longer than ``width`` (the notebook's own
    table keeps the whole text)."""
    return textwrap.shorten(text, width, placeholder=" …") if text else ""

@dataclass
class Verdict:
    id: str  # stable: what the report, the summary and compare read
    kind: str  # one of KINDS
    name: str  # for a reader; may change with any release
    value: float | None
    threshold: float
    comparison: str
    passed: bool
    unit: str = ""
    detail: str = ""
    notebook: str = ""
    source: str = ""  # where the threshold comes from (a control of this run, a published target, a parameter)

    @classmethod
    def make(cls, id: str, kind: str, name: str, value: Any, comparison: str, threshold: float, unit: str = "",
             detail: str = "", notebook: str = "", source: str = "") -> "Verdict":
        if kind in SOURCE_REQUIRED and not source:
            raise ValueError(f"verdict {id!r}: a {kind} verdict must say where its threshold comes from (source=)")
        if comparison not in COMPARISONS:
            raise ValueError(f"comparison must be one of {sorted(COMPARISONS)}, not {comparison!r}")
        if kind not in KINDS:
            raise ValueError(f"verdict {id!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        v = to_jsonable(value)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        passed = bool(ok and COMPARISONS[comparison](v, threshold))
        return cls(id, kind, name, v if ok else None, float(threshold), comparison, passed, unit, detail, notebook, source)


def format_number(x: float | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.3g}"
    if ax >= 100:
        return f"{x:.1f}"
    return f"{x:.4g}"


def unnamed_fields_refused(name: str, data: Any) -> Any:
    """``data``, or ValueError where a record has a field without a name (pandas' default ``0`` column of an
    unnamed Series): every field of the results JSON says what it is."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            bad = [k for k in item if str(k).strip().lstrip("-").isdigit() or str(k).strip() == ""]
            if bad:
                raise ValueError(f"{name!r}: fields without a name {bad}; name them (e.g. Series.rename)")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return data


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class Results:
    """What one notebook measured. Build it up, then :meth:`save`."""

    notebook: str
    results_dir: Path
    params: dict[str, Any] = field(default_factory=dict)
    params_hash: str = ""
    status: str = "ok"
    reason: str | None = None
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.results_dir) / f"{self.notebook}.json"

    @property
    def log_dir(self) -> Path:
        """Where servers and tools of this run write their logs."""
        return Path(self.results_dir).parent / "logs"

    def metric(self, name: str, value: Any) -> Any:
        self.metrics[name] = unnamed_fields_refused(name, to_jsonable(value))
        return value

    def table(self, name: str, records: Any) -> Any:
        data = unnamed_fields_refused(name, to_jsonable(records))
        if not isinstance(data, list):
            raise TypeError(f"table {name!r} must be a list of records or a DataFrame")
        self.tables[name] = data
        return records

    def verdict(self, id: str, kind: str, name: str, value: Any, comparison: str, threshold: float, unit: str = "",
                detail: str = "", source: str = "") -> Verdict:
        v = Verdict.make(id, kind, name, value, comparison, threshold, unit=unit, detail=detail, notebook=self.notebook,
                         source=source)
        self.verdicts = [x for x in self.verdicts if x.id != id] + [v]
        return v

    def find(self, id: str) -> Verdict | None:
        """The verdict with this id, or None."""
        return next((v for v in self.verdicts if v.id == id), None)

    def of_kind(self, *kinds: str) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind in kinds]

    def note(self, text: str) -> None:
        self.notes.append(text)

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "notebook": self.notebook,
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "params": to_jsonable(self.params),
            "params_hash": self.params_hash,
            "environment": to_jsonable(self.environment),
            "metrics": self.metrics,
            "tables": self.tables,
            "verdicts": [asdict(v) for v in self.verdicts],
            "notes": list(self.notes),
        }

    def save(self) -> Path:
        self.finished_at = _now()
        write_json_atomic(self.path, self.to_dict())
        return self.path

    @classmethod
    def from_dict(cls, data: dict[str, Any], results_dir: Path) -> "Results":
        r = cls(notebook=data["notebook"], results_dir=results_dir)
        r.params = data.get("params", {})
        r.params_hash = data.get("params_hash", "")
        r.status = data.get("status", "ok")
        r.reason = data.get("reason")
        r.started_at = data.get("started_at") or r.started_at
        r.finished_at = data.get("finished_at")
        r.environment = data.get("environment", {})
        r.metrics = data.get("metrics", {})
        r.tables = data.get("tables", {})
        r.verdicts = [Verdict(**v) for v in data.get("verdicts", [])]
        r.notes = data.get("notes", [])
        return r


def load(path: Path) -> Results:
    data = json.loads(Path(path).read_text())
    if data.get("schema") not in READABLE_SCHEMAS:
        raise ValueError(f"{path}: results schema {data.get('schema')!r}, expected one of {READABLE_SCHEMAS}")
    return Results.from_dict(data, Path(path).parent)


def load_all(results_dir: Path) -> list[Results]:
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            out.append(load(p))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            r = Results(notebook=p.stem, results_dir=Path(results_dir), status="failed", reason=f"unreadable results: {e}")
            out.append(r)
    return out

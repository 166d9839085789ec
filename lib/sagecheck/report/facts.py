"""The engine's facts as a run's results recorded them (:meth:`sagecheck.engines.Engine.facts`): what was compared, the
tensor-parallel size, whether the engine serves, which parameters its speed and memory figures depend on. The report
and ``compare`` read them here and know no engine's parameters."""

from __future__ import annotations

from typing import Any, Iterable

from sagecheck import results as R
from sagecheck.params import labels
from sagecheck.registry import ENGINES

# where the results predate the facts: what any engine's figures depend on
GENERIC_DEPENDS_ON = ("model", "revision", "dtype", "engine", "baseline", "candidate", "candidate_phases")


def engine_facts(results: Iterable[R.Results], params: dict[str, Any]) -> dict[str, Any]:
    """The facts the notebooks recorded; for results written before they were, what the parameters give without
    knowing the engine (its labels from the registry, one rank)."""
    for res in results:
        got = res.environment.get("engine") if isinstance(res.environment, dict) else None
        if isinstance(got, dict):
            return got
    engine = str(params.get("engine") or "?")
    base, cand = labels(params)
    return {"name": engine, "labels": {"baseline": base, "candidate": cand},
            "description": f"baseline `{base}` vs candidate `{cand}`",
            "table": {"engine": engine, "baseline": base, "candidate": cand}, "tp": 1,
            "serves": bool(ENGINES.info(engine).get("serves")) if engine in ENGINES else False,
            "depends_on": {"speed": [*GENERIC_DEPENDS_ON, "throughput.decode_tokens"],
                           "memory": [*GENERIC_DEPENDS_ON, "memory.decode_tokens"]}}

"""One run folder, loaded once: its manifest, parameters and every notebook's results.

The report, the PR summary, the recommendation and ``compare`` all work from a :class:`LoadedRun`;
they read only what a run folder holds (``run.json`` and ``results/*.json``, the results contract),
never a notebook.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagecheck import results as R
from sagecheck.params import ParamError


@dataclass
class LoadedRun:
    path: Path
    manifest: dict[str, Any]
    params: dict[str, Any]
    results: dict[str, R.Results]  # by notebook stem, the summary notebook's included
    label: str = ""  # the run's name beside others (compare)

    def result(self, prefix: str) -> R.Results | None:
        """The results of the notebook named ``prefix`` (``04`` or ``04_throughput``)."""
        for name, res in self.results.items():
            if name == prefix or name.split("_", 1)[0] == prefix:
                return res
        return None

    @property
    def measured(self) -> list[R.Results]:
        """Every notebook's results but the summary's, in numeric order."""
        return [r for name, r in sorted(self.results.items()) if name != R.SUMMARY_NOTEBOOK]

    @property
    def environment(self) -> dict[str, Any]:
        """00_environment's facts; without it, the brief environment every results file carries."""
        env = self.result("00")
        if env is not None and env.status == "ok" and env.metrics:
            return env.metrics
        for res in self.results.values():
            if res.environment:
                brief = dict(res.environment)
                brief["versions"] = {k: brief.get(k) for k in ("torch", "transformers", "sglang", "sageattention")}
                brief["git"] = {"sha": brief.get("git_sha")}
                return brief
        return {}

    @functools.cached_property
    def facts(self) -> dict[str, Any]:
        """The engine's facts as the notebooks recorded them (:mod:`sagecheck.report.facts`)."""
        from sagecheck.report.facts import engine_facts

        return engine_facts(self.results.values(), self.params)

    @property
    def model(self) -> dict[str, Any]:
        """The model that ran as the notebooks recorded it (name, source, checksum); the parameter where none did."""
        found = next((r.environment["model"] for r in self.results.values() if isinstance(r.environment.get("model"), dict)),
                     None)
        return found or {"name": str(self.params.get("model", "?")), "source": None, "sha256": None}

    @property
    def title(self) -> str:
        """The run's title, ``{model}`` replaced by the name of the model that ran."""
        return str(self.params.get("title") or "sagecheck report").replace("{model}", self.model["name"])

    @property
    def gpu(self) -> str:
        return next((r.environment["gpu"] for r in self.results.values() if r.environment.get("gpu")), "not recorded")

    @property
    def sageattention(self) -> str | None:
        """Which sageattention ran, for the header: the package (version, or a source build and where) and, where 00
        probed it, the kernel its entry point dispatched to; None where none is installed."""
        label = next((r.environment["sageattention"] for r in self.results.values() if r.environment.get("sageattention")), None)
        if not label or label == "not installed":
            return None
        env = self.result("00")
        probe = ((env.metrics.get("sage_kernel") or {}).get("dispatched") if env is not None else None)
        return label + (f" -> {probe['kernel']}" if isinstance(probe, dict) else "")

    @functools.cached_property
    def counts(self) -> dict[str, int]:
        from sagecheck.report.summary import counts

        return counts(self.measured)

    @functools.cached_property
    def reading(self) -> dict[str, str]:
        """The opening's sentences by what they say, computed once (:mod:`sagecheck.report.recommendation`)."""
        from sagecheck.report.recommendation import parts

        return parts(self.measured, self.params)

    @functools.cached_property
    def accurate(self) -> bool:
        """Accuracy checks ran, all pass, and no code path fails (:func:`sagecheck.report.recommendation.accurate`)."""
        from sagecheck.report.recommendation import accurate

        return accurate([r for r in self.measured if r.notebook != R.SUMMARY_NOTEBOOK])

    @property
    def recommendation(self) -> list[str]:
        """The opening sentences in order."""
        return [s for s in self.reading.values() if s]


def load_run(path: str | Path, require_results: bool = True) -> LoadedRun:
    """A run folder; :class:`ParamError` (one line) where it is none (or, with ``require_results``, has no results)."""
    path = Path(path)
    if not path.is_dir():
        raise ParamError(f"run folder not found: {path}")
    results_dir = path / "results"
    if require_results and (not results_dir.is_dir() or not any(results_dir.glob("*.json"))):
        raise ParamError(f"{path} is not a run folder: no results/*.json (a folder written by `python -m sagecheck run`)")
    manifest: dict[str, Any] = {}
    if (path / "run.json").is_file():
        try:
            manifest = json.loads((path / "run.json").read_text())
        except json.JSONDecodeError as e:
            raise ParamError(f"{path / 'run.json'} is not valid JSON: {e}") from None
    results = {r.notebook: r for r in R.load_all(results_dir)} if results_dir.is_dir() else {}
    params = manifest.get("params") or _params_from_results(results.values())
    return LoadedRun(path=path, manifest=manifest, params=params, results=results)


def _params_from_results(results: Any) -> dict[str, Any]:
    """Without run.json: the union of the notebooks' parameters (each holds the run-wide keys and its own section's)."""
    merged: dict[str, Any] = {}
    for r in results:
        for k, v in r.params.items():
            merged.setdefault(k, v)
    return merged


"""The notebook files: which there are, which a run selects, and their committed ``parameters`` cells.

Notebooks are named ``NN_name.ipynb`` and run in their numeric order; the summary notebook
(:data:`sagecheck.results.SUMMARY_NOTEBOOK`) always runs, last. Committed notebooks carry no outputs
and one ``parameters`` cell whose defaults come from the schema
(:func:`sagecheck.params.parameters_cell_source`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nbformat

from sagecheck.environment import project_root
from sagecheck.params import ParamError, parameters_cell_source
from sagecheck.results import SUMMARY_NOTEBOOK


def default_dir() -> Path:
    return (project_root() or Path.cwd()) / "notebooks"


def discover(notebooks_dir: Path) -> list[Path]:
    """Notebooks named ``NN_name.ipynb``, in order."""
    return sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb") if p.is_file())


def select(notebooks: list[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks named by ``only`` (stem, number prefix or name); the summary always runs last."""
    if only is None:
        return list(notebooks)
    names = [name.strip() for name in only if name.strip()]
    if not names:
        raise ParamError("--only names no notebook; give numbers or names, e.g. --only 02,03")
    wanted: list[Path] = []
    for name in names:
        match = [nb for nb in notebooks if name in (nb.stem, nb.name, nb.stem.split("_", 1)[0], nb.stem.split("_", 1)[-1])]
        if not match:
            available = ", ".join(nb.stem for nb in notebooks)
            raise ParamError(f"--only: no notebook named '{name}'; available: {available}")
        wanted.extend(m for m in match if m not in wanted)
    wanted += [nb for nb in notebooks if nb.stem == SUMMARY_NOTEBOOK and nb not in wanted]
    return sorted(wanted)


def parameter_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def sync_parameter_cells(notebooks_dir: Path | None = None, check: bool = False) -> list[Path]:
    """Rewrite (or with ``check`` only list) notebooks whose parameters cell differs from the schema."""
    changed = []
    for path in discover(notebooks_dir or default_dir()):
        nb = nbformat.read(path, as_version=4)
        cells = parameter_cells(nb)
        if len(cells) != 1:
            raise ValueError(f"{path}: {len(cells)} cells tagged 'parameters', want exactly 1")
        wanted = parameters_cell_source(path.stem)
        if cells[0].source != wanted:
            changed.append(path)
            if not check:
                cells[0].source = wanted
                nbformat.write(nb, path)
    return changed

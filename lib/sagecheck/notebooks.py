"""Notebook hygiene: the committed notebooks carry no outputs and one ``parameters`` cell
whose defaults come from the schema (:func:`sagecheck.params.parameters_cell_source`)."""

from __future__ import annotations

from pathlib import Path

import nbformat

from sagecheck.params import parameters_cell_source


def parameter_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def sync_parameter_cells(notebooks_dir: Path | None = None, check: bool = False) -> list[Path]:
    """Rewrite (or with ``check`` only list) notebooks whose parameters cell differs from the schema."""
    from sagecheck.run import default_notebooks_dir, discover

    changed = []
    for path in discover(notebooks_dir or default_notebooks_dir()):
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

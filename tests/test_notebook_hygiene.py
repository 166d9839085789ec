"""Committed notebooks: no outputs, exactly one parameters cell, defaults written from the schema."""

from __future__ import annotations

import nbformat
import pytest

from sagecheck.notebooks import parameter_cells, sync_parameter_cells
from sagecheck.params import NOTEBOOK_SECTIONS, parameters_cell_source
from sagecheck.notebooks import default_dir as default_notebooks_dir
from sagecheck.notebooks import discover

NOTEBOOKS = discover(default_notebooks_dir())


def test_the_design_notebooks_exist():
    assert {nb.stem for nb in NOTEBOOKS} == set(NOTEBOOK_SECTIONS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_outputs_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} has outputs committed"
            assert cell.execution_count is None
    cells = parameter_cells(nb)
    assert len(cells) == 1
    assert cells[0].source == parameters_cell_source(path.stem)


def test_sync_check_reports_nothing_to_do():
    assert sync_parameter_cells(check=True) == []

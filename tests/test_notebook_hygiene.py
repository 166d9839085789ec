"""Committed notebooks: no outputs, exactly one parameters cell, defaults written from the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_with_its_type_and_meaning(path):
    """`papermill --help-notebook` documents each parameter: papermill's own parser finds all of them, typed, explained."""
    from papermill.translators import PythonTranslator

    from sagecheck.params import RUN_KEYS, Params, notebook_parameters

    found = PythonTranslator.inspect(parameter_cells(nbformat.read(path, as_version=4))[0])
    assert [p.name for p in found] == [*notebook_parameters(Params(), path.stem), *RUN_KEYS]
    for p in found:
        assert p.inferred_type_name not in ("None", "") and p.help, p


def test_papermill_help_lists_no_unknown_type():
    import subprocess
    import sys
    from pathlib import Path

    papermill = Path(sys.executable).with_name("papermill")
    done = subprocess.run([str(papermill), "--help-notebook", str(NOTEBOOKS[2])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Parameters inferred" in done.stdout, done.stderr
    assert "Unknown type" not in done.stdout and "n_short: int (default 8)" in done.stdout


def test_papermill_on_a_bad_parameter_says_one_line_and_exits_2(tmp_path):
    """papermill's own CLI: sagecheck's one line, not thirty lines of papermill's traceback above it."""
    papermill = Path(sys.executable).with_name("papermill")
    done = subprocess.run([str(papermill), str(NOTEBOOKS[2]), str(tmp_path / "out.ipynb"), "-k", "sagecheck", "-p", "windw", "100"],
                          capture_output=True, text=True, timeout=300, cwd=NOTEBOOKS[2].parent)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("sagecheck: 02_logits has no parameter 'windw'")

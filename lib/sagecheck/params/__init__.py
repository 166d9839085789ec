"""One schema for every parameter of a run.

A run is described by a YAML file (``params/*.yaml``) plus ``-p key=value``
overrides. Everything is validated here, before any notebook starts: an unknown
key or a wrong type is reported as one line naming the key, the value and what
is allowed (:class:`ParamError`, exit code 2 in the CLI). Names of attention
implementations, engines and task sources are those of :mod:`sagecheck.registry`.
Whether the files and models the parameters name exist is checked by
:mod:`sagecheck.sources`, which also makes local paths absolute.

The package: :mod:`.schema` (the sections and their checks), :mod:`.loading` (files, overrides, one-line errors),
:mod:`.wiring` (what each notebook receives and its ``parameters`` cell).

Each notebook receives the measurement parameters (the common ones plus its own
section), flattened into plain variables (papermill injects them after the
notebook's ``parameters`` cell). The run-level keys (:data:`RUN_LEVEL`: the title,
the notebook selection) reach no notebook and no hash, so changing them reruns
nothing under ``--resume``. The same schema writes the defaults of the
``parameters`` cell (:func:`parameters_cell_source`), so a notebook opened in
JupyterLab runs top to bottom on the embedded default.
"""

from __future__ import annotations

from pathlib import Path

from sagecheck.params.loading import REMOVED, did_you_mean, load_params, parse_override, read_file, validate
from sagecheck.params.schema import (COMMON_KEYS, MAX_COUNT, MAX_TOKENS, NOTEBOOK_SECTIONS, RUN_KEYS, RUN_LEVEL, SECTIONS,
                                     ParamError, Params, TaskSpec, labels, measurement, params_hash, section_for)
from sagecheck.params.wiring import (NotebookParams, from_notebook, notebook_parameters, parameters_cell_source,
                                     resolve_run_dir, type_name)

# the embedded default (the built-in model, no GPU, no download): what `make report` and a run without --params run;
# params/default.yaml in the project is a link to it
EMBEDDED_DEFAULT = Path(__file__).with_name("default.yaml")

__all__ = ["EMBEDDED_DEFAULT", "COMMON_KEYS", "MAX_COUNT", "MAX_TOKENS", "NOTEBOOK_SECTIONS", "RUN_KEYS", "RUN_LEVEL", "REMOVED", "SECTIONS",
           "NotebookParams", "ParamError", "Params", "TaskSpec", "did_you_mean", "from_notebook", "labels", "load_params",
           "measurement", "notebook_parameters", "parameters_cell_source", "params_hash", "parse_override", "read_file",
           "resolve_run_dir", "section_for", "type_name", "validate"]

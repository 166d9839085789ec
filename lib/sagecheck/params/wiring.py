"""The parameters as each notebook receives them: its flat variables (the common keys and its own section), the
``parameters`` cell written from the schema, its view of them (:class:`NotebookParams`), and where a notebook run by
hand writes its results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from sagecheck.params.loading import validate
from sagecheck.params.schema import COMMON_KEYS, SECTIONS, Params, section_for

def notebook_parameters(params: Params, notebook: str) -> dict[str, Any]:
    """The flat variables a notebook receives: the common measurement keys plus its own section."""
    dumped = params.model_dump(mode="json")
    flat = {k: dumped[k] for k in COMMON_KEYS}
    section = section_for(notebook)
    if section:
        flat.update(dumped[section])
    return flat


def from_notebook(notebook: str, namespace: dict[str, Any]) -> Params:
    """Rebuild validated :class:`Params` from a notebook's variables (the files they name are checked by
    :mod:`sagecheck.sources`). Invalid values raise :class:`ParamError`."""
    data: dict[str, Any] = {k: namespace[k] for k in COMMON_KEYS if k in namespace}
    section = section_for(notebook)
    if section:
        fields = SECTIONS[section].model_fields
        data[section] = {k: namespace[k] for k in fields if k in namespace}
    return validate(data, notebook)


def type_name(annotation: Any) -> str:
    """A schema annotation as the parameters cell writes it for papermill (``--help-notebook`` shows it): int, float,
    str, bool, list[int], Optional[int], dict (a section such as ``sglang``), list[dict] (the tasks)."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return type(args[0]).__name__
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"Optional[{type_name(inner[0])}]" if len(inner) == 1 else "object"
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "dict"
    return getattr(annotation, "__name__", "object")


def _meaning(field: Any) -> str:
    import typing

    words = field.description or ""
    choices = [typing.get_args(a) for a in [field.annotation, *typing.get_args(field.annotation)] if typing.get_origin(a) is Literal]
    if choices and not all(str(c) in words for c in choices[0]):
        words = f"one of {', '.join(map(str, choices[0]))}" + (f": {words}" if words else "")
    return " ".join(words.split())


def parameters_cell_source(notebook: str) -> str:
    """The committed ``parameters`` cell of a notebook: the schema's defaults, each with its type and meaning (papermill
    reads them: ``papermill --help-notebook`` lists them)."""
    flat = notebook_parameters(Params(), notebook)
    section = section_for(notebook)
    fields = {**{k: Params.model_fields[k] for k in COMMON_KEYS}, **(SECTIONS[section].model_fields if section else {})}
    lines = [
        "# Parameters: defaults from sagecheck.params (the embedded default), each with its type and meaning.",
        "# `python -m sagecheck run` injects the values of the run below this cell; so does `papermill -p NAME VALUE`.",
    ]
    for key, value in flat.items():
        kind = type_name(fields[key].annotation)
        kind = f'"{kind}"' if "[" in kind else kind
        meaning = _meaning(fields[key])
        lines.append(f"{key}: {kind} = {value!r}" + (f"  # {meaning}" if meaning else ""))
    lines.append('run_dir: str = ""  # folder of the run\'s results (empty: outputs/interactive in the project root)')
    lines.append("servers: dict = {}  # the run's servers by role, where its engine serves (the runner fills it; empty: the "
                 "notebook starts its own)")
    return "\n".join(lines)


def resolve_run_dir(run_dir: str) -> Path:
    """Where a notebook writes results when run by hand (``run_dir`` empty)."""
    if run_dir:
        return Path(run_dir)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder / "outputs" / "interactive"
    return here / "outputs" / "interactive"


class NotebookParams:
    """A notebook's view of the parameters: its own section's keys and the common keys as attributes.

    ``P.kl_mean_max`` reads the section, ``P.model`` the common part; ``P.all`` is the full :class:`Params`.
    """

    def __init__(self, params: Params, notebook: str, servers: dict[str, Any] | None = None) -> None:
        self.all = params
        self.notebook = notebook
        section = section_for(notebook)
        self.section = getattr(params, section) if section else None
        self.servers = dict(servers or {})  # the run's servers by role (run key servers)

    def __getattr__(self, name: str) -> Any:
        section = self.__dict__.get("section")
        if section is not None and name in type(section).model_fields:
            return getattr(section, name)
        return getattr(self.__dict__["all"], name)

    def with_common(self, **changes: Any) -> "NotebookParams":
        """The same view with common keys changed (e.g. another engine for what this one cannot give)."""
        return NotebookParams(self.all.model_copy(update=changes), self.notebook, self.servers)

"""Parameters from a YAML file and ``-p key=value`` overrides, validated against the schema: a bad one is one line
(:class:`~sagecheck.params.schema.ParamError`) naming the key, the value, where it came from and what is allowed."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sagecheck.params.schema import ParamError, Params


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"'{key}' is given twice (lines {first} and {again}); YAML would keep the second silently")


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (plain YAML keeps the last one without a word)."""


def _mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(err: dict, data: dict, origin: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(err["loc"]))
    override = origin.startswith("-p ")
    where = "" if override or not origin else f" in {origin}"
    given = f" (given as {origin})" if override else ""
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Params
        for part in loc[:-1]:
            if part not in model.model_fields:  # a list index: the model of the list's items is already chosen
                continue
            ann = model.model_fields[part].annotation
            item = (getattr(ann, "__args__", None) or [None])[0]  # list[Model] -> Model
            for cand in (ann, item):
                if isinstance(cand, type) and issubclass(cand, BaseModel):
                    model = cand
                    break
        allowed = sorted(model.model_fields)
        scope = ".".join(loc[:-1]) or "the top level"
        return (
            f"unknown parameter '{key}'{where}{did_you_mean(loc[-1], allowed)}; "
            f"allowed at {scope}: {', '.join(allowed)}{given}"
        )
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "too_short":
        msg = "must list at least one value"
    return f"parameter '{key}'{where} = {value!r}: {msg}{given}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value`` -> (["key", "sub"], value parsed as YAML)."""
    if "=" not in text:
        raise ParamError(f"override '{text}' must look like key=value (e.g. -p logits.n_short=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ParamError(f"override '{text}': '{key}' is not a parameter name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def read_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a params file; :class:`ParamError` in one line for a missing or malformed file."""
    p = Path(path)
    if p.is_dir():
        raise ParamError(f"params file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ParamError(f"params file not found: {p}")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeys) or {}  # noqa: S506 - a safe loader
    except UnicodeDecodeError as e:
        raise ParamError(f"params file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except _DuplicateKey as e:
        raise ParamError(f"params file {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamError(f"params file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ParamError(f"params file {p} must hold a mapping of parameters, not {type(loaded).__name__}")
    return loaded


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params file, apply ``key=value`` overrides, validate the schema (not yet the files it names:
    :func:`sagecheck.sources.load` does both)."""
    data: dict[str, Any] = read_file(path) if path is not None else {}
    given: dict[tuple[str, ...], str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        given[tuple(keys)] = text
    return validate(data, str(path) if path is not None else "", given)


# thresholds that were constants: each accuracy threshold is now what the accepted-precision control loses in the run
REMOVED = {f"{section}.{key}": "accuracy thresholds come from the accepted-precision control measured in the same run "
                               "(accuracy_control), not from a constant"
           for section, keys in {"logits": ("kl_mean_max", "top1_min"), "perplexity": ("delta_max_pct",),
                                 "activation_drift": ("final_cosine_min", "final_rel_l2_max"),
                                 "context_length": ("accuracy_delta_max", "loss_delta_max"), "tasks": ("delta_max_pp",),
                                 "code_paths": ("cold_max_mean_abs",)}.items() for key in keys}


def _removed(data: dict[str, Any], origin: str) -> None:
    """A parameter this version no longer has is named with why, not as an unknown key."""
    for dotted, why in REMOVED.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            where = f" in {origin}" if origin else ""
            raise ParamError(f"parameter '{dotted}'{where} was removed: {why}; delete it")


def _origin(loc: tuple, origin: str, overrides: dict[tuple[str, ...], str]) -> str:
    """Where the value at ``loc`` came from: the ``-p`` override that set it (or a section above it), else ``origin``."""
    keys = tuple(str(p) for p in loc)
    for n in range(len(keys), 0, -1):
        if keys[:n] in overrides:
            return f"-p {overrides[keys[:n]]}"
    return origin


def validate(data: dict[str, Any], origin: str = "", overrides: dict[tuple[str, ...], str] | None = None) -> Params:
    """The schema over ``data``; an error names where the bad value came from: ``origin`` (a params file, a notebook),
    or the ``-p`` override in ``overrides`` (its key path -> its text) that set it."""
    _removed(data, origin)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ParamError(_format_error(err, data, _origin(err["loc"], origin, overrides or {}))) from None

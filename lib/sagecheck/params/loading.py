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

def did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(err: dict, data: dict, origin: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(err["loc"]))
    where = f" in {origin}" if origin else ""
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
            f"allowed at {scope}: {', '.join(allowed)}"
        )
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "too_short":
        msg = "must list at least one value"
    return f"parameter '{key}'{where} = {value!r}: {msg}"


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
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ParamError(f"params file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ParamError(f"params file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ParamError(f"params file {p} must hold a mapping of parameters, not {type(loaded).__name__}")
    return loaded


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params file, apply ``key=value`` overrides, validate the schema (not yet the files it names:
    :func:`sagecheck.sources.load` does both)."""
    data: dict[str, Any] = read_file(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    return validate(data, str(path) if path is not None else "")


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


def validate(data: dict[str, Any], origin: str = "") -> Params:
    _removed(data, origin)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamError(_format_error(e.errors()[0], data, origin)) from None

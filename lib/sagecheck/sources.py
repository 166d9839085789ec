"""The run's inputs, checked before any work starts: the model, the texts, the task files, the SGLang interpreter.

:func:`load` is what the runner and the CLI call: the schema (:func:`sagecheck.params.load_params`),
then every local path the parameters name must exist. Local paths are made absolute (notebooks run
in ``notebooks/``, not where the run was started), relative to the params file, else to where the
run started. A name that is no local path is a hub id, loaded where it is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sagecheck.params import ParamError, Params, load_params
from sagecheck.registry import MODELS

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_NAMED_TEXTS = ("builtin", "wikitext", "ptb")  # anything else must be a local file or folder
TEXT_FIELDS = (("logits", "text"), ("perplexity", "dataset"), ("activation_drift", "text"), ("context_length", "text"),
               ("code_paths", "text"))
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def looks_like_path(value: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is a local path."""
    if value.startswith((".", "/", "~")) or Path(value).exists():
        return True
    return not _HUB_ID.fullmatch(value)


def existing(key: str, value: str, base: Path) -> Path:
    """The existing local path ``value`` (as given, else relative to ``base``), or ParamError."""
    candidate = Path(os.path.expanduser(value))
    if not candidate.is_absolute() and not candidate.exists():
        candidate = base / candidate
    if not candidate.exists():
        raise ParamError(f"parameter '{key}' = {value!r}: local path does not exist")
    return candidate


def resolve(params: Params, base: Path) -> Params:
    """Check every local input ``params`` names and make it absolute (in place); returns ``params``."""
    model = params.model
    if model.startswith("random:"):
        from sagecheck.models import random_config_path

        try:
            random_config_path(model.split(":", 1)[1])
        except FileNotFoundError as e:
            raise ParamError(f"parameter 'model' = {model!r}: {e}") from None
    elif model in MODELS:
        params.model = MODELS.canonical(model)
        if MODELS.info(model)["kind"] == "packaged":
            from sagecheck.models.packaged import PackagedModelMissing

            try:
                MODELS.load(model).check_available()
            except PackagedModelMissing as e:
                raise ParamError(f"parameter 'model' = {model!r}: {e}") from None
    elif looks_like_path(model):
        params.model = str(existing("model", model, base).resolve())
    for section, field in TEXT_FIELDS:
        value = getattr(getattr(params, section), field)
        if value not in _NAMED_TEXTS:
            setattr(getattr(params, section), field, str(existing(f"{section}.{field}", value, base).resolve()))
    for i, task in enumerate(params.tasks.tasks):
        if Path(task.source).suffix in TASK_FILE_SUFFIXES:
            task.source = str(existing(f"tasks.tasks[{i}].source", task.source, base).resolve())
    if params.sglang.python:
        existing("sglang.python", params.sglang.python, base)
    return params


def check_machine(params: Params) -> None:
    """What the parameters ask of this machine, checked before any work (a preset for a GPU machine still validates
    elsewhere: ``sagecheck params``): the CUDA device, the sageattention entry point, a hub model it can reach."""
    check_device(params.device)
    check_sage_kernel(params.sage_kernel)
    check_hub_model(params.model, params.revision)


def check_hub_model(model: str, revision: str | None = None, timeout_s: float = 10.0) -> None:
    """A model named by a hub id must be in the local Hugging Face cache or on a hub this machine reaches: asked once,
    with a short timeout, before any work (else every notebook would fail on it, each after the hub client's retries)."""
    if model in MODELS or model.startswith("random:") or looks_like_path(model):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ParamError(f"parameter 'model' = {model!r}: not a local folder and not in the Hugging Face cache, and "
                         "HF_HUB_OFFLINE is set; give a local folder")
    import requests

    from sagecheck.models import hub_token

    token = hub_token()
    url = f"{constants.ENDPOINT}/api/models/{model}" + (f"/revision/{revision}" if revision else "")
    try:
        answer = requests.get(url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"} if token else {})
    except requests.RequestException as e:
        raise ParamError(f"parameter 'model' = {model!r}: not a local folder, not in the Hugging Face cache, and the hub "
                         f"cannot be reached from here ({type(e).__name__}); give a local folder") from None
    if answer.status_code in (401, 403, 404):
        private = "" if token else " (or a private or gated one: export HF_TOKEN)"
        raise ParamError(f"parameter 'model' = {model!r}: no such model on the Hugging Face hub{private}"
                         + (f" at revision {revision!r}" if revision else ""))


def check_sage_kernel(name: str) -> None:
    """A named sageattention entry point must be in the sageattention this machine imports (read from its source, not
    imported); ``auto`` always is."""
    if name == "auto":
        return
    from sagecheck.environment import sageattention_label, sageattention_package

    pkg = sageattention_package()
    if not pkg["installed"]:
        raise ParamError(f"parameter 'sage_kernel' = {name!r}: sageattention is not installed on this machine")
    if name not in pkg["entry_points"]:
        raise ParamError(f"parameter 'sage_kernel' = {name!r}: the installed sageattention ({sageattention_label(pkg)}) "
                         f"has no such entry point; it offers: auto, {', '.join(pkg['entry_points'])}")


def check_device(device: str) -> None:
    """A CUDA device this machine does not have is refused before anything runs (not after a notebook fails on it)."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if count == 0:
        raise ParamError(f"parameter 'device' = {device!r}: this machine has no CUDA GPU (torch {torch.__version__}); "
                         "use device: auto or cpu")
    if index >= count:
        raise ParamError(f"parameter 'device' = {device!r}: this machine shows {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """A params file with ``key=value`` overrides: validated, and every local input found (paths made absolute)."""
    params = load_params(path, overrides)
    return resolve(params, Path(path).parent if path is not None else Path.cwd())

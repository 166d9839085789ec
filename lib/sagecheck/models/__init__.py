"""Where the model under test comes from.

``model`` parameter values:

* ``builtin``: the reference model shipped in this package (``models/sagecheck-tiny-llama``);
* a packaged model by its name (``smollm2-135m``: :mod:`sagecheck.models.packaged`), a pretrained model that a package
  of the package registry ships, converted once into a local folder;
* a Hugging Face model id (``meta-llama/Llama-3.1-8B-Instruct``) or a local folder: both go
  through ``from_pretrained``, the same code path; a hub token is read from ``$HF_TOKEN``;
* ``random:<config>``: a model built from a config with random weights, no download
  (``random:llama-3.1-8b`` ships with the package; a path to a ``config.json`` works too).
  It has no tokenizer of its own: the built-in tokenizer's ids are used as input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODELS_DIR = Path(__file__).parent
BUILTIN_NAME = "sagecheck-tiny-llama"
CONFIGS_DIR = MODELS_DIR / "configs"


def builtin_path() -> Path:
    return MODELS_DIR / BUILTIN_NAME


def random_config_path(name: str) -> Path:
    shipped = CONFIGS_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    known = ", ".join(sorted(c.stem for c in CONFIGS_DIR.glob("*.json")))
    raise FileNotFoundError(f"no model config '{name}' (shipped: {known}; or give a path to a config.json)")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # builtin | packaged | pretrained | random
    location: str  # folder, hub id, or config path (packaged: the converted folder, made by local())
    revision: str | None = None
    name: str | None = None  # packaged: its registered name

    @property
    def tokenizer_location(self) -> str:
        return str(builtin_path()) if self.kind == "random" else self.location


def packaged_model(source: ModelSource) -> Any:
    """The :class:`~sagecheck.models.packaged.PackagedModel` behind a packaged source."""
    from sagecheck.registry import MODELS

    return MODELS.load(source.name)


def resolve(model: str, revision: str | None = None) -> ModelSource:
    from sagecheck.registry import MODELS

    if model == "builtin":
        return ModelSource("builtin", str(builtin_path()))
    if model in MODELS and MODELS.info(model)["kind"] == "packaged":
        name = MODELS.canonical(model)
        return ModelSource("packaged", str(MODELS.load(name).folder()), name=name)
    if model.startswith("random:"):
        return ModelSource("random", str(random_config_path(model.split(":", 1)[1])))
    p = Path(model).expanduser()
    if p.exists() and p.resolve() == builtin_path().resolve():
        return ModelSource("builtin", str(builtin_path()))
    return ModelSource("pretrained", str(p) if p.exists() else model, revision)


def hub_token() -> str | None:
    """The hub token from the environment (never a parameter, never printed)."""
    from sagecheck.redact import SECRET_ENV_VARS

    for var in SECRET_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def local(source: ModelSource) -> ModelSource:
    """``source`` ready to load: a packaged model converted into its folder where that has not happened yet."""
    if source.kind == "packaged":
        packaged_model(source).ensure_folder()
    return source


def describe(source: ModelSource) -> dict[str, Any]:
    """What ran, as 00, the results and the report's header name it: the model's name, where it came from, the
    checksum of its weights where the project knows it (the built-in model's, a packaged model's pinned file)."""
    if source.kind == "packaged":
        return packaged_model(source).describe()
    if source.kind == "builtin":
        import hashlib

        weights = builtin_path() / "model.safetensors"
        return {"name": f"{BUILTIN_NAME} (built-in)", "source": f"sagecheck package: models/{BUILTIN_NAME}",
                "format": "safetensors, float16", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    if source.kind == "random":
        return {"name": f"random weights ({Path(source.location).stem} config)", "source": source.location,
                "format": "random initialization, seeded", "sha256": None}
    where = "local folder" if Path(source.location).exists() else "Hugging Face hub" + (
        f" (revision {source.revision})" if source.revision else "")
    return {"name": Path(source.location).name if Path(source.location).exists() else source.location,
            "source": f"{where}: {source.location}", "format": "transformers", "sha256": None}


def describe_model(model: str, revision: str | None = None) -> dict[str, Any]:
    """:func:`describe` of the ``model`` parameter."""
    return describe(resolve(model, revision))


def label(model: str) -> str:
    """The model parameter in words for titles: 'the built-in model', 'SmolLM2-135M-Instruct', a folder's name, a hub id."""
    from sagecheck.registry import MODELS

    if model == "builtin":
        return "the built-in model"
    if model in MODELS and MODELS.info(model)["kind"] == "packaged":
        return MODELS.load(model).display
    if model.startswith("random:"):
        return f"random weights ({model.split(':', 1)[1]})"
    return Path(model).name if Path(model).exists() else model


def load_config(source: ModelSource) -> Any:
    """The model's transformers config (no weights): head counts and the like, for checks against what a server ran."""
    from transformers import AutoConfig

    source = local(source)
    kwargs = {"revision": source.revision} if source.kind == "pretrained" and source.revision else {}
    return AutoConfig.from_pretrained(source.location, token=hub_token(), **kwargs)


def load_tokenizer(source: ModelSource) -> Any:
    if source.kind in ("builtin", "random"):
        # the built-in tokenizer is a plain `tokenizers` file: load it directly, without
        # AutoTokenizer's class resolution (seconds of imports)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(source.tokenizer_location)
    from transformers import AutoTokenizer

    source = local(source)
    kwargs = {"revision": source.revision} if source.kind == "pretrained" and source.revision else {}
    tok = AutoTokenizer.from_pretrained(source.tokenizer_location, token=hub_token(), **kwargs)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int = 0,
) -> Any:
    """The model in eval mode on ``device`` with ``attn_implementation`` (a transformers registry name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sagecheck.attention.hf import register

    register()  # our implementation names must be known before a model is built with one
    source = local(source)
    if source.kind == "random":
        config = AutoConfig.from_pretrained(source.location)
        config._attn_implementation = attn_implementation
        from sagecheck.runtime import seed_everything

        seed_everything(seed)  # random weights: the same for a seed, whatever ran before
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        finally:
            torch.set_default_dtype(previous)
        return model.eval()

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation, "token": hub_token()}
    if source.revision:
        kwargs["revision"] = source.revision
    if device.type == "cuda" and torch.cuda.device_count() > 1 and device.index is None:
        kwargs["device_map"] = "auto"  # larger than one GPU: let accelerate spread the layers
        return AutoModelForCausalLM.from_pretrained(source.location, **kwargs).eval()
    model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    return model.to(device).eval()

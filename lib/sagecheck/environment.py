"""What exactly was measured on what: hardware, driver and package versions, git SHA.

Only versions and hardware facts are collected, never environment variables
(a hub token lives there).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("sagecheck", "torch", "triton", "transformers", "tokenizers", "sglang", "sageattention", "papermill", "nbconvert", "numpy")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def project_root() -> Path | None:
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file() and (folder / "lib" / "sagecheck").is_dir():
            return folder
    return None


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    if os.environ.get("SAGECHECK_GIT_SHA"):  # a copy of the tree without .git (a lent GPU machine, a container)
        return {"sha": os.environ["SAGECHECK_GIT_SHA"], "dirty": None}
    root = project_root()
    if root is None:
        return {"sha": "unknown (installed package)", "dirty": None}

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        # an unpacked archive inside some other repository: that repository's commit is not sagecheck's
        if not top or Path(top).resolve() != root.resolve():
            return {"sha": "unknown (not run from a git checkout of sagecheck)", "dirty": None}
        sha = git("rev-parse", "HEAD") or "unknown (no commit)"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown (git not available)", "dirty": None}
    return {"sha": sha, "dirty": dirty}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, Any]]:
    """One record per visible CUDA device; empty without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    driver = nvml_driver_version()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 2),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "driver": driver,
            }
        )
    return gpus


def nvml_driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (CPU machine) or no driver
        return "n/a"


def collect() -> dict[str, Any]:
    """Everything notebook 00 shows."""
    try:
        import torch

        cuda = torch.version.cuda or "n/a (CPU build)"
        cudnn = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a"
        threads = torch.get_num_threads()
    except ImportError:
        cuda, cudnn, threads = "n/a", "n/a", None
    gpus = gpu_info()
    return {
        "gpus": gpus,
        "gpu": gpus[0]["name"] if gpus else "none (CPU only)",
        "gpu_memory_gib": gpus[0]["memory_gib"] if gpus else None,
        "driver": gpus[0]["driver"] if gpus else "n/a",
        "cuda": cuda,
        "cudnn": cudnn,
        "versions": {name: package_version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "os": platform.platform(),
        "hostname_hash": _short_hash(platform.node()),
        "git": git_info(),
    }


def brief() -> dict[str, Any]:
    """The short form stored in every results JSON."""
    gpus = gpu_info()
    return {
        "gpu": gpus[0]["name"] if gpus else "none (CPU only)",
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "sageattention": package_version("sageattention"),
        "sglang": package_version("sglang"),
        "git_sha": git_info()["sha"],
    }


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]

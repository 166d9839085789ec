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

from sagecheck.gpu_clocks import gpu_limits, limit_words

PACKAGES = ("sagecheck", "torch", "triton", "transformers", "tokenizers", "sglang", "sageattention", "papermill", "nbconvert", "numpy")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def sageattention_smooths_out_of_place() -> bool:
    """Whether the importable sageattention's ``smooth_k`` leaves K unwritten: SageAttention 2 subtracts the mean
    inside K's quantization; 1.0.6 does ``k -= km`` on the caller's tensor (``core.py`` of each)."""
    return sageattention_package()["generation"] == 2


def sageattention_package() -> dict[str, Any]:
    """Which sageattention ``import sageattention`` finds, without importing it (that would load Triton or CUDA
    libraries): its version (the package metadata where the found files are that package's, else a source build on the
    path, e.g. SageAttention 2 compiled from source, which has no metadata and may shadow an installed 1.0.6), its
    generation (2 has the FP8 P·V CUDA kernels) and its entry points."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("sageattention")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return {"installed": False, "version": "not installed", "generation": None, "path": None, "entry_points": [],
                "source_build": False}
    folder = Path(spec.origin).resolve().parent
    core = folder / "core.py"
    text = core.read_text(errors="replace") if core.is_file() else ""
    generation = 2 if "sageattn_qk_int8_pv_fp8_cuda" in text else 1
    entry_points = sorted(set(re.findall(r"^def (sageattn\w*)\(", text, flags=re.M)))
    owned = False
    try:
        dist = metadata.distribution("sageattention")
        owned = Path(dist.locate_file("sageattention/__init__.py")).resolve() == Path(spec.origin).resolve()
    except metadata.PackageNotFoundError:
        dist = None
    source_build = not (dist is not None and owned)
    version = f"{generation}.x built from source (no package metadata)" if source_build else dist.version
    return {"installed": True, "version": version, "generation": generation, "path": str(folder), "entry_points": entry_points,
            "source_build": source_build}


def sageattention_label(pkg: dict[str, Any] | None = None) -> str:
    """One line for tables and headers: "1.0.6", or "2.x built from source (no package metadata) at /tmp/sa2"."""
    pkg = pkg or sageattention_package()
    if not pkg["installed"]:
        return "not installed"
    return pkg["version"] + (f" at {pkg['path']}" if pkg["source_build"] else "")


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
        changed = git("status", "--porcelain", "--untracked-files=normal")  # tracked changes and new files git would add
        files = git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown (git not available)", "dirty": None}
    if not changed:
        return {"sha": sha, "dirty": False}
    return {"sha": sha, "dirty": True, "tree": source_fingerprint(root, files)}


def source_fingerprint(root: Path, files: list[str]) -> str:
    """12 hex digits of SHA-256 over the source as it is on disk: every file git tracks or would add (not what it
    ignores), by path and content. It depends on the files alone, not on the commit they sit on, so a run from a copy
    of the tree whose git history is older (a lent GPU machine's) and a checkout of the commit that holds the same files
    read alike, and different code reads differently."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(set(files)):
        path = root / name
        if path.is_file():  # a tracked file deleted in the working tree is not part of what ran
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


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
                # the power limit sets how far a power-dense kernel, and the decode after it, holds the clock down:
                # speed figures of GPUs at different limits differ for that alone (compare shows the limit)
                **gpu_limits(i),
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
        "versions": {name: sageattention_label() if name == "sageattention" else package_version(name) for name in PACKAGES},
        "sageattention": sageattention_package(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "os": platform.platform(),
        "hostname_hash": _short_hash(platform.node()),
        "git": git_info(),
    }


def gpu_name() -> str:
    """The first visible GPU's name, or ``none (CPU only)``."""
    gpus = gpu_info()
    return gpus[0]["name"] if gpus else "none (CPU only)"


def facts(env: dict[str, Any], params: Any) -> dict[str, Any]:
    """The machine as 00 shows it: hardware, driver, CUDA, the commit, the parameters' hash, device and dtype used."""
    from sagecheck import runtime
    from sagecheck.params import params_hash

    device = runtime.resolve_device(params.device)
    git = env["git"]
    tree = f", source {git['tree']}" if git.get("tree") else ""  # the fingerprint of the files that ran
    return {
        "GPU": env["gpu"],
        "GPU memory (GiB)": env["gpu_memory_gib"] if env["gpus"] else "n/a",
        "GPUs visible": len(env["gpus"]),
        "GPU limits": (limit_words(env["gpus"][0]) or "not known (NVML did not say)") if env["gpus"] else "n/a",
        "driver": env["driver"],
        "CUDA (torch build)": env["cuda"],
        "cuDNN": env["cudnn"],
        "Python": env["python"],
        "CPU": f"{env['cpu']} ({env['cpu_count']} logical cores, torch uses {env['torch_threads']} threads)",
        "OS": env["os"],
        "git commit": git["sha"] + (f" (uncommitted changes{tree})" if git["dirty"] else ""),
        "parameters hash": params_hash(params),
        "device used": str(device),
        "dtype used": runtime.dtype_name(runtime.resolve_dtype(params.dtype, device)),
    }


def record(results: Any, env: dict[str, Any], shown: dict[str, Any]) -> None:
    """00's results: everything collected, the parameters' hash, the device and dtype used."""
    for key, value in env.items():
        results.metric(key, value)
    results.metric("params_hash", shown["parameters hash"])
    results.metric("device", shown["device used"])
    results.metric("dtype", shown["dtype used"])


def brief() -> dict[str, Any]:
    """The short form stored in every results JSON."""
    return {
        "gpu": gpu_name(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "sageattention": sageattention_label(),
        "sglang": package_version("sglang"),
        "git_sha": git_info()["sha"],
    }


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]

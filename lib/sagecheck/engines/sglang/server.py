"""An SGLang server's lifecycle: the command line, start, readiness, logs, stop.

The server runs ``python -m sglang.launch_server`` in its own process group, with its
output written to a log file in the run folder. Readiness is ``GET /health_generate``
answering 200, as in SGLang's own test harness (``sglang/test/test_utils.py``). If the
process exits or never becomes ready, :class:`ServerError` carries the last lines of
the log. Stopping ends the whole process group (SGLang starts scheduler and detokenizer
processes of its own); the server also gets SIGTERM if the process that started it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from sagecheck.engines import EngineError

DTYPE_ARG = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


class ServerError(EngineError):
    """The server could not start, did not become ready, or died; the message quotes its log.

    ``cause``: one line, the log's own words where it has them (the exception or the argument
    parser's error), for tables and one-line failures; ``str()`` adds the log's last lines.
    """


_CAUSE_PATTERNS = (
    re.compile(r"\bsage_attn: .+"),  # the plugin's own refusals
    re.compile(r"error: argument .+"),  # argparse, e.g. an unknown --attention-backend
    re.compile(r"\b[A-Za-z_][\w.]*(?:Error|Exception|Unavailable): .+"),
)


def log_cause(text: str) -> str | None:
    """The most telling line of a server log: the plugin's refusal, an argument error, else the last exception."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in _CAUSE_PATTERNS:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                return m.group(0)[:400]
    return None


# SGLang 0.5.15 derives further ports from --port (its gRPC port is port + 10000, refused above 65535), so a
# server's port must leave that room: the kernel's ephemeral ports (up to 60999 on Linux) do not.
PORT_RANGE = (20000, 55000)


def free_port(host: str = "127.0.0.1", port_range: tuple[int, int] = PORT_RANGE) -> int:
    """A port in ``port_range`` that nothing listens on now (and whose +10000 is free too)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*port_range)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, p))
        except OSError:
            continue
        return port
    raise ServerError(f"no free port found in {port_range[0]}-{port_range[1]} on {host}")


def log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not Path(path).exists():
        return "(no log)"
    text = Path(path).read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class LaunchSpec:
    """Everything that goes on the ``sglang.launch_server`` command line."""

    model_path: str
    attention_backend: str | None
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "auto"
    tp: int = 1
    mem_fraction_static: float | None = None
    disable_cuda_graph: bool = False
    context_length: int | None = None
    seed: int | None = None
    load_format: str | None = None
    max_total_tokens: int | None = None
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.host, "--port", str(self.port)]
        if self.attention_backend:
            cmd += ["--attention-backend", self.attention_backend]
        if self.dtype != "auto":
            cmd += ["--dtype", DTYPE_ARG[self.dtype]]
        if self.tp != 1:
            cmd += ["--tp", str(self.tp)]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.disable_cuda_graph:
            cmd.append("--disable-cuda-graph")
        if self.context_length is not None:
            cmd += ["--context-length", str(self.context_length)]
        if self.seed is not None:
            cmd += ["--random-seed", str(self.seed)]
        if self.load_format:
            cmd += ["--load-format", self.load_format]
        if self.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        return cmd + [str(a) for a in self.extra_args]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so no server outlives its notebook."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """A running ``sglang.launch_server`` process (a context manager)."""

    def __init__(self, spec: LaunchSpec, log_dir: Path, startup_timeout_s: float = 600, poll_s: float = 1.0,
                 env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.port_chosen = spec.port == 0  # ours to choose again where another process took it first
        if spec.port == 0:
            spec.port = free_port(spec.host)
        self.spec = spec
        self.url = spec.url
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.name = log_dir, name
        self.log_path = self._log_path()
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self.env = env
        self.process: subprocess.Popen | None = None

    def _log_path(self) -> Path:
        label = f"{self.name}-" if self.name else ""
        return self.log_dir / f"sglang-{label}{self.spec.attention_backend or 'default'}-{self.spec.port}.log"

    def start(self) -> "Server":
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> "Server":
        """Start the process and return at once (``wait_ready`` waits for it). Launch from the thread that will
        outlive the server: the child's parent-death signal fires when the launching *thread* ends."""
        cmd = self.spec.command()
        log = open(self.log_path, "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            env={**os.environ, **(self.env or {})},
        )
        log.close()
        return self

    def _error(self, what: str) -> ServerError:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        cause = log_cause(text)
        first = f"the SGLang server (--attention-backend {self.spec.attention_backend}) {what}" + (f": {cause}" if cause else "")
        return ServerError(f"{first}. Last lines of {self.log_path}:\n{log_tail(self.log_path)}", cause=first)

    def _port_taken(self) -> bool:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return bool(re.search(r"already in use", text, re.IGNORECASE))

    def wait_ready(self, port_retries: int = 3) -> None:
        """Wait for ``/health_generate``; where the port chosen for it was taken by another process before the server
        bound it (it exits saying the address is in use), launch it again on another port, up to ``port_retries`` times.
        It asks every 0.1 s at first, then less often, up to every ``poll_s``: a server that is ready in a second (the
        tests' forked stand-in) is not kept waiting, one that loads for minutes is not asked ten times a second."""
        deadline = time.monotonic() + self.startup_timeout_s
        pause = min(0.1, self.poll_s)
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None and self.port_chosen and port_retries > 0 and self._port_taken():
                port_retries -= 1
                self.spec.port = free_port(self.spec.host)
                self.url, self.log_path = self.spec.url, self._log_path()
                self.launch()
                continue
            if code is not None:
                raise self._error(f"exited with code {code} before it was ready")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(pause)
            pause = min(self.poll_s, pause * 1.5)
        self.stop()
        raise self._error(f"was not ready after {self.startup_timeout_s:g} s; it was stopped")

    def check_alive(self, wait_s: float = 5.0) -> None:
        """Raise :class:`ServerError` with the log if the process has exited (a dying one gets ``wait_s`` to finish)."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return
        if self.process.poll() is not None:
            raise self._error(f"died with code {self.process.returncode}")

    def stop(self, grace_s: float = 15.0) -> None:
        """End the whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children that outlived the leader (still in the group)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def random_model_folder(config_path: Path, tokenizer_dir: Path, target: Path) -> Path:
    """A folder SGLang can load with ``--load-format dummy``: the config and a tokenizer, no weights."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, target / "config.json")
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, target / f.name)
    return target


def launch_spec(params: Any, backend: str | None, log_dir: Path, mem_fraction_static: float | None = None) -> LaunchSpec:
    """The command line for ``params`` and one attention backend (None: SGLang's default)."""
    from sagecheck import models

    source = models.local(models.resolve(params.model, params.revision))
    s = params.sglang
    load_format = None
    model_path = source.location
    if source.kind == "random":
        model_path = str(random_model_folder(Path(source.location), Path(source.tokenizer_location), log_dir / "random-model"))
        load_format = "dummy"  # SGLang initialises the weights at random itself
    extra = list(s.extra_args)
    if source.kind == "pretrained" and source.revision:
        extra += ["--revision", source.revision]
    return LaunchSpec(
        model_path=model_path, attention_backend=backend, dtype=params.dtype, tp=s.tp,
        mem_fraction_static=mem_fraction_static if mem_fraction_static is not None else s.mem_fraction_static,
        disable_cuda_graph=s.disable_cuda_graph, context_length=s.context_length, seed=params.seed,
        load_format=load_format, max_total_tokens=s.max_total_tokens, extra_args=extra, python=s.python or sys.executable,
    )

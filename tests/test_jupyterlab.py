"""JupyterLab as its users use it: the server `make lab` starts (headless here, as root where the tests run as root)
finds the project's `sagecheck` kernel, and a notebook runs through a kernel the server started, top to bottom on the
embedded default's parameters cell with a small override, writing its results."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import requests

from sagecheck import results as R
from sagecheck.notebooks import parameter_cells
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_command(port: int, token: str) -> list[str]:
    """What `make lab` runs (its LAB_ARGS add --allow-root for root), headless on a chosen port and token."""
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={ROOT / 'notebooks'}", "--ServerApp.ip=127.0.0.1"]
    return args + (["--allow-root"] if os.geteuid() == 0 else [])


def test_make_lab_passes_allow_root_to_root():
    done = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = next(line for line in done.stdout.splitlines() if "jupyter lab" in line)
    assert ("--allow-root" in line) == (os.geteuid() == 0), line


def test_a_notebook_runs_through_the_lab_servers_sagecheck_kernel(tmp_path):
    from jupyter_client import BlockingKernelClient

    from sagecheck.run import ensure_kernel

    ensure_kernel()  # as `make lab` (through its venv stamp) does
    port, token = _free_port(), "sagecheck-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    server = subprocess.Popen(_lab_command(port, token), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "lab.log", "w"), start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()[-2000:]
            try:
                if requests.get(f"{base}/api/status", headers=auth, timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        specs = requests.get(f"{base}/api/kernelspecs", headers=auth, timeout=10).json()["kernelspecs"]
        assert "sagecheck" in specs and specs["sagecheck"]["spec"]["argv"][0] == sys.executable
        assert requests.get(f"{base}/lab", headers=auth, timeout=10).ok  # the JupyterLab page itself
        kernel = requests.post(f"{base}/api/kernels", headers=auth, json={"name": "sagecheck"}, timeout=60).json()

        client = BlockingKernelClient()
        client.load_connection_file(str(tmp_path / "runtime" / f"kernel-{kernel['id']}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        nb = nbformat.read(ROOT / "notebooks" / "00_environment.ipynb", as_version=4)
        cells = [c.source for c in nb.cells if c.cell_type == "code"]
        assert cells[0] == parameter_cells(nb)[0].source
        cells.insert(1, f"run_dir = {str(tmp_path / 'run')!r}\ndevice = 'cpu'")  # what a user edits by hand
        for source in cells:
            reply = client.execute_interactive(source, timeout=120, output_hook=lambda msg: None)
            assert reply["content"]["status"] == "ok", reply["content"]
        client.stop_channels()
        res = R.load(tmp_path / "run" / "results" / "00_environment.json")
        assert res.status == "ok" and res.metrics["device"] == "cpu"
        assert res.metrics["versions"]["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
        assert requests.delete(f"{base}/api/kernels/{kernel['id']}", headers=auth, timeout=30).status_code == 204
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode is not None

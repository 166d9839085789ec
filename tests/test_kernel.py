"""The notebooks' kernel (``python -m sagecheck.kernel``): ipykernel that skips the interpreter's teardown at exit."""

from __future__ import annotations

import sys

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from sagecheck.run import kernel_argv


def run_in_sagecheck_kernel(code: str) -> tuple[list[str], bool]:
    """The streamed text of ``code`` run in the kernel, and whether the kernel is still alive after a shutdown request."""
    km = KernelManager()
    km._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "sagecheck.kernel", "-f", "{connection_file}"],
                                 language="python", display_name="sagecheck.kernel")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    out: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", "")))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return out, km.is_alive()


def test_the_run_starts_notebooks_in_sagecheck_kernel():
    assert kernel_argv()[1:3] == ["-m", "sagecheck.kernel"] and "{connection_file}" in kernel_argv()


def test_the_kernel_runs_code_streams_its_output_and_ends_cleanly_after_the_shutdown_request():
    code = "import torch\nprint(int(torch.ones(3).sum()), flush=False)\nimport sys; sys.stderr.write('to stderr')"
    out, alive = run_in_sagecheck_kernel(code)
    assert "3\n" in out and "to stderr" in out
    assert not alive

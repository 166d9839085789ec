"""Stand-in SGLang servers forked from one process per test worker (:mod:`sagecheck.forkserver`).

A full test run starts 48 stand-in servers (counted by their logs); each imported torch, transformers and sagecheck on
its own: 9.2-10.4 s a start on an idle 2-core machine, 0.9 s forked. A test worker starts one fork server for them (``conftest.py``) and names its socket in
``SAGECHECK_STANDIN_FORKSERVER``, which every process the tests start inherits: ``python -m sglang.launch_server``
(:mod:`tests.standin.sglang.launch_server`) then has a server forked from it. Each is still a fresh process with the
launcher's environment, arguments, directory and log; modules the launcher's PYTHONPATH adds (the wrong variants'
plugins, a shadowed sageattention) are found as before, since the fork server preloads none of them and no plugin
registers itself before the server parses its arguments.

Tests about a server's process itself (what is left running after a stop, a server that outlives the process that
started it) start it on its own: :func:`unforked`.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "SAGECHECK_STANDIN_FORKSERVER"
STANDIN = Path(__file__).resolve().parent
ROOT = STANDIN.parents[1]
PRELOAD = (
    "torch",
    "transformers.models.llama.modeling_llama",
    "sagecheck.models",
    "sagecheck.engines.hf",
    "sagecheck.attention.sage_emulated",
    "sagecheck.sglang_plugin.stats",
    "sagecheck.sglang_plugin.settings",
    "sglang.srt.server_args",
    "sglang.srt.plugins",
    "tests.standin.faults",
)


def fork_server():
    """The fork server of one test worker (a :class:`sagecheck.forkserver.ForkServer`, not started)."""
    from sagecheck.forkserver import ForkServer

    path = os.pathsep.join([str(STANDIN), str(ROOT), str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])
    return ForkServer([], {"PYTHONPATH": path}, preload=PRELOAD, target="tests.standin.server",
                      what="stand-in SGLang server")


def unforked(monkeypatch) -> None:
    """Stand-in servers started from now on in this test are processes of their own (not forked)."""
    monkeypatch.delenv(SOCKET_ENV, raising=False)

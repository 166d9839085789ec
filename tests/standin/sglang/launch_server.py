"""STAND-IN for ``python -m sglang.launch_server`` (tests only; see the package docstring).

The command line is SGLang's; the server behind it is :mod:`tests.standin.server`. Where the tests started a fork
server for stand-ins (:mod:`tests.standin.forked`), this process has it fork a server that imported torch,
transformers and sagecheck once, and stands for that server (signals relayed, its exit status returned); otherwise
it is the server itself. So this module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the project root: tests.standin


def serve_here(args: list[str]) -> int:
    from tests.standin.server import main

    main(args)
    return 0


if __name__ == "__main__":
    from tests.standin.forked import SOCKET_ENV

    socket_path = os.environ.get(SOCKET_ENV)
    if socket_path:
        from sagecheck.forkserver import launch

        sys.exit(launch(socket_path, sys.argv[1:], serve_here))
    sys.exit(serve_here(sys.argv[1:]))

"""``python -m sagecheck.kernel``: the notebooks' Jupyter kernel, ipykernel ending without Python's interpreter teardown.

A kernel that imported torch and transformers takes long to exit once it has answered the shutdown request: the
interpreter's finalization collects and tears down thousands of modules (several times a kernel's that imported
nothing). Each notebook of a run pays that, for nothing: by then
ipykernel has replied, its threads are joined and its streams flushed. So an ``atexit`` hook, registered before any
other (they run last-in-first-out: this one runs after all the others, ipykernel's and IPython's included), flushes
stdout and stderr and ends the process with its exit status, skipping only the module teardown that would follow.
Everything else is ``ipykernel_launcher``: the same application, arguments and ``sys.path`` handling.
"""

from __future__ import annotations

import atexit
import os
import sys

_status = 0
_installed = False


def _end_without_teardown() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or replaced stream has nothing left to flush
            pass
    os._exit(_status)


def end_without_teardown_at_exit() -> None:
    """Register the exit hook, once per process. A process that imports more before the kernel starts (the fork server
    of :mod:`sagecheck.forkserver`) registers it first, so that it still runs after every other hook."""
    global _installed
    if not _installed:
        atexit.register(_end_without_teardown)
        _installed = True


# the fork server (sagecheck.forkserver) calls this before its imports, whose exit hooks the kernels it forks inherit
prepare_fork_server = end_without_teardown_at_exit


def main() -> None:
    global _status
    end_without_teardown_at_exit()
    if sys.path and sys.path[0] == "":  # as ipykernel_launcher does
        del sys.path[0]
    from ipykernel import kernelapp

    try:
        kernelapp.launch_new_instance()
    except SystemExit as e:
        _status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise


if __name__ == "__main__":
    main()

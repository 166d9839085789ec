"""Notebook kernels forked from one process that has already imported torch, transformers and sagecheck.

Every notebook of a run gets a fresh kernel process, as before: nothing a notebook loads, seeds or allocates reaches
the next one. What the kernels no longer repeat is the import: torch, transformers' Llama, pandas, seaborn and
sagecheck take about 6 s of CPU in each new process on a 2-core machine (of 7 s for the skipped 05_memory), the
largest part of a run on the built-in model. So a run starts one *fork server*, which imports them once and then
forks a child per kernel; the child takes the environment, working directory, standard streams and arguments of the
process Jupyter started, and becomes ``python -m sagecheck.kernel``.

Jupyter starts a small *launcher* in place of the kernel (``python -m sagecheck.forkserver launch SOCKET ...``). The
launcher hands its request and its streams to the server over a Unix socket, relays the signals Jupyter sends it
(interrupt, terminate) to the kernel it got, and exits with that kernel's exit status: to Jupyter it is the kernel
process. Killed outright, it takes the kernel with it (the kernel watches the launcher's end of the socket). Where no
server answers, the launcher runs the kernel itself, as a plain ``python -m sagecheck.kernel`` would.

CUDA cannot be used in a process forked after CUDA was initialized, and GNU OpenMP not after a parallel region ran:
after its imports the server checks both (:func:`_why_forking_is_unsafe`) and, where either happened, says why and
stops; the launchers then start plain kernels. On a CPU machine the imports do neither. On the H200 with the SGLang
kit's transformers 5.12.1, importing the Llama module initializes CUDA (torch._dynamo's device interface asks for the
current device), so there every kernel starts on its own, as before the server existed.

A program that runs many runs one after the other (the tests do) can keep one server for all of them: a run whose
environment names a server's socket in ``SAGECHECK_FORKSERVER`` forks its kernels there instead of starting its own.

The same server forks other programs that import torch at their start, by naming another *target* (a module with a
``main()``, run as ``python -m TARGET`` would run it): the tests fork their stand-in SGLang servers this way.

This module is imported by every launcher, so it imports nothing heavy at its top.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

KERNEL = "sagecheck.kernel"
RUNNING_SERVER_ENV = "SAGECHECK_FORKSERVER"  # the socket of a fork server that is already running (module docstring)
# the modules every notebook imports, and their slow dependencies (seconds of CPU that every kernel would repeat)
PRELOAD = (
    "torch",
    "transformers.models.llama.modeling_llama",
    "ipykernel.kernelapp",
    "sagecheck.session",
    "sagecheck.show",
    "sagecheck.plots",
)
# what ipykernel sets before the notebook's first import of matplotlib, which reads it then: the server imports
# matplotlib, so it sets it first (where the environment names no backend of its own)
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
_MESSAGE_BYTES = 1 << 20
_STREAMS = (0, 1, 2)
_RELAYED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_server_cwd: str | None = None  # the fork server's directory, which ``python -m`` put first on its sys.path


# ------------------------------------------------------------------ the runner's side


class ForkServer:
    """The fork server of one run, started at the first kernel asked of it: ``with ForkServer(args, env) as server:
    ... server.kernel_manager_class() ...``.

    ``kernel_args`` are the arguments of ``python -m TARGET`` (the notebooks' kernel unless ``target`` names another
    module), ``kernel_env`` the variables its kernel spec adds to the environment. The server imports in the
    environment the kernels get (this process's, with those), so that what a library reads from the environment at
    import is what a kernel would have read. ``what`` names a forked process in the line that says forking is unsafe.
    ``path``: the socket of a server that is already running, which this object uses and neither starts nor stops.
    """

    def __init__(self, kernel_args: list[str], kernel_env: dict[str, str], display_name: str = "sagecheck",
                 preload: tuple[str, ...] = PRELOAD, trial_timeout_s: float = 20.0, target: str = KERNEL,
                 what: str = "notebook's kernel", path: str | None = None):
        self.kernel_args = kernel_args
        self.preload = preload
        self.trial_timeout_s = trial_timeout_s
        self.kernel_env = kernel_env
        self.display_name = display_name
        self.target = target
        self.what = what
        self._dir: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None
        self._manager: type | None = None
        self.path = path
        self._running_elsewhere = path is not None

    def start(self) -> ForkServer:
        if self._process is not None or self._running_elsewhere:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="sagecheck-kernels-")
        self.path = os.path.join(self._dir.name, "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(self.path)
            listener.listen(8)  # a launcher may connect at once: the server accepts it once its imports are done
            # its own session: a Ctrl-C in the terminal is the runner's to handle (it stops the server), and the kernels,
            # as Jupyter's own, are not in the terminal's process group
            config = {"target": self.target, "what": self.what, "preload": list(self.preload),
                      "trial_timeout_s": self.trial_timeout_s}
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sagecheck.forkserver", "serve", str(listener.fileno()), json.dumps(config)],
                env={"MPLBACKEND": INLINE_BACKEND, **os.environ, **self.kernel_env}, pass_fds=[listener.fileno()],
                start_new_session=True, stdin=subprocess.DEVNULL)
        finally:
            listener.close()
        return self

    def launcher_argv(self) -> list[str]:
        """The command Jupyter starts in place of ``python -m TARGET KERNEL_ARGS``."""
        self.start()
        return [sys.executable, "-m", "sagecheck.forkserver", "launch", str(self.path), self.target, *self.kernel_args]

    def kernel_spec(self) -> Any:
        """The Jupyter kernel spec whose kernels this server forks."""
        from jupyter_client.kernelspec import KernelSpec

        return KernelSpec(argv=self.launcher_argv(), env=self.kernel_env, language="python",
                          display_name=self.display_name, interrupt_mode="signal")

    def kernel_manager_class(self) -> type:
        """A Jupyter kernel manager (nbclient's, through papermill) that starts the kernels of :meth:`kernel_spec`."""
        if self._manager is None:
            from jupyter_client.manager import AsyncKernelManager

            spec = self.kernel_spec()

            class ForkedKernelManager(AsyncKernelManager):
                @property
                def kernel_spec(self) -> Any:
                    return spec

            self._manager = ForkedKernelManager
        return self._manager

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._dir is not None:
            self._dir.cleanup()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ the server


def serve(listener_fd: int, config: dict[str, Any]) -> None:
    """Import the target, then the modules of ``config["preload"]``, then fork a process running the target's ``main()``
    for every launcher that connects, until terminated. A target may define ``prepare_fork_server()``, called before the
    preloads (the kernel registers its exit hook there, which must run after theirs, as in a kernel)."""
    target = importlib.import_module(config["target"])
    if hasattr(target, "prepare_fork_server"):
        target.prepare_fork_server()
    global _server_cwd
    _server_cwd = os.getcwd()
    listener = socket.socket(fileno=listener_fd)
    runner = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops the server; a Ctrl-C is the runner's
    for name in config["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass  # a kernel that needs it fails the same way, in its notebook, where the error is seen
    unsafe = _why_forking_is_unsafe(float(config["trial_timeout_s"]))
    if unsafe:
        sys.stderr.write(f"sagecheck: each {config['what']} starts on its own ({unsafe})\n")
        return
    children: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            pid = _fork(conn, listener, children, target)
            if pid:
                children[pid] = conn
        _reap(children)
        if os.getppid() != runner:  # the runner ended without stopping the server (killed): its kernels are no one's
            for pid in children:
                _relay(pid, signal.SIGKILL)
            return


def _why_forking_is_unsafe(timeout_s: float) -> str | None:
    """Why a kernel forked from this process could not compute, or None.

    CUDA cannot be used in a child forked after it was initialized. GNU OpenMP (torch's) cannot run a parallel region in
    a child forked after the parent ran one: the child waits for ever for threads it does not have (measured: torch's
    CPU build, two threads, one matrix product before the fork). Imports run none, but that is the imports' behaviour,
    not a promise: a trial child runs torch's parallel code, and must finish.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.cuda.is_initialized():
        return "an import initialized CUDA"
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            a = torch.ones(512, 512)
            ok = float((a @ a).sum()) == 512.0**3 and float(torch.ones(1 << 20).sum()) == float(1 << 20)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return None if code == 0 else f"a forked trial of torch's parallel code ended with status {code}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return f"a forked trial of torch's parallel code did not finish in {timeout_s:.0f} s"


def _fork(conn: socket.socket, listener: socket.socket, children: dict[int, socket.socket], target: Any) -> int | None:
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MESSAGE_BYTES, len(_STREAMS))
        request = json.loads(data)
    except (OSError, ValueError):
        conn.close()
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            for other in children.values():
                other.close()
            _become(conn, request, fds, target)
        except SystemExit:  # the kernel's end: up and out of the interpreter, whose exit hooks end it as a kernel's do
            raise
        except BaseException:  # noqa: BLE001 - a child never returns into the server's loop
            import traceback

            traceback.print_exc()
            os._exit(1)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode())
    except OSError:
        pass  # the launcher is gone: the kernel sees that and ends
    return pid


def _reap(children: dict[int, socket.socket]) -> None:
    """Tell each launcher whose kernel ended how it ended."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass
            conn.close()


def _become(conn: socket.socket, request: dict[str, Any], fds: list[int], target: Any) -> None:
    """In the forked child: take the launcher's streams, environment, directory and arguments, and run the target."""
    import threading

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number, fd in zip(_STREAMS, fds):
        os.dup2(fd, number)
        os.close(fd)
    server_pythonpath = os.environ.get("PYTHONPATH", "")
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if sys.path and sys.path[0] == _server_cwd:  # what ``python -m`` put first: the kernel's own directory
        sys.path[0] = request["cwd"]
    _take_python_path(server_pythonpath, request["env"].get("PYTHONPATH", ""))

    def end_with_the_launcher() -> None:
        try:
            conn.recv(1)  # the launcher sends nothing more: this returns when it has ended
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=end_with_the_launcher, name="sagecheck-launcher-watch", daemon=True).start()
    sys.argv = [target.__name__, *request["args"]]
    target.main()
    sys.exit(0)


def _take_python_path(server: str, launcher: str) -> None:
    """Where the launcher's PYTHONPATH names folders the server's did not, put them where Python would have: after the
    script's directory, before the rest (modules the server imported stay the server's)."""
    if launcher == server:
        return
    known = {os.path.abspath(p) for p in server.split(os.pathsep) if p}
    new = [os.path.abspath(p) for p in launcher.split(os.pathsep) if p and os.path.abspath(p) not in known]
    sys.path[1:1] = [p for p in dict.fromkeys(new) if p not in sys.path]
    importlib.invalidate_caches()


# ------------------------------------------------------------------ the launcher


def launch(path: str, args: list[str], plain: Callable[[list[str]], int]) -> int:
    """Have the server at ``path`` fork its target with ``args``; relay signals to it; return its exit status. Where no
    server forks it, ``plain(args)`` runs the target in this process instead."""
    parent = os.getppid()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return plain(args)
    request = {"args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], list(_STREAMS))
        reply = conn.recv(_MESSAGE_BYTES)
    except OSError:
        reply = b""
    if not reply:  # the server stopped before forking (it found forking unsafe, or was stopped)
        conn.close()
        return plain(args)
    pid = json.loads(reply)["pid"]
    for name in _RELAYED_SIGNALS:
        signal.signal(getattr(signal, name), lambda number, _frame: _relay(pid, number))
    ended = _wait_for_the_end(conn, pid, parent)
    status = json.loads(ended)["status"] if ended else 1
    if status < 0:  # ended by a signal: end the same way
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


def _wait_for_the_end(conn: socket.socket, pid: int, parent: int) -> bytes:
    """The server's message that the kernel ended; or, where the process that started the launcher (Jupyter's, the
    runner) ends first, nothing, after killing the kernel: a plain kernel ends with its parent in the same way
    (ipykernel's parent poller), a forked one is not the runner's child and would not notice."""
    conn.settimeout(0.5)
    while True:
        try:
            return conn.recv(_MESSAGE_BYTES)
        except TimeoutError:
            if os.getppid() != parent:
                _relay(pid, signal.SIGKILL)
                return b""


def _relay(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def exec_module(target: str) -> Callable[[list[str]], int]:
    """A ``plain`` for :func:`launch`: become ``python -m TARGET ARGS`` (the same process: signals reach it itself)."""

    def run(args: list[str]) -> int:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", target, *args])

    return run


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 3:
        serve(int(argv[1]), json.loads(argv[2]))
        return 0
    if argv[:1] == ["launch"] and len(argv) >= 3:
        return launch(argv[1], argv[3:], exec_module(argv[2]))
    sys.stderr.write("usage: python -m sagecheck.forkserver serve FD CONFIG-JSON | launch SOCKET TARGET-MODULE ARGS...\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Kernels forked from a process that imported torch once (sagecheck.forkserver): each a fresh process with the
launcher's environment, directory and streams; interrupts reach it, its exit status comes back, a killed launcher takes
it along; where forking is unsafe, kernels start on their own and still run."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from jupyter_client.manager import KernelManager

from sagecheck.forkserver import ForkServer
from sagecheck.run import KERNEL_ARGS, KERNEL_ENV
from tests.conftest import ROOT

PROBE = "import os, sys; print(os.getpid(), os.getppid(), os.getcwd(), 'torch' in sys.modules, os.environ.get('SAGECHECK_PROBE'), os.environ.get('TQDM_DISABLE'))"
# a module whose import runs one of torch's parallel regions (with two threads): afterwards, a forked child would hang
PARALLEL_AT_IMPORT = "tests.forkserver_parallel_import"


class Kernel:
    """One kernel of ``server``, driven as nbclient drives it."""

    def __init__(self, server: ForkServer, cwd: str, env: dict[str, str] | None = None):
        self.km = KernelManager()
        self.km._kernel_spec = server.kernel_spec()
        self.km.start_kernel(cwd=cwd, env={**os.environ, **(env or {})})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.launcher = self.km.provisioner.process  # the process Jupyter started (the provisioner forgets it at shutdown)

    def run(self, code: str, timeout: float = 60, **execute_args) -> tuple[str, dict]:
        out: list[str] = []
        reply = self.kc.execute_interactive(code, timeout=timeout, **execute_args,
                                            output_hook=lambda m: out.append(m["content"].get("text", "")))
        return "".join(out), reply["content"]

    def reply_to(self, msg_id: str, timeout: float) -> dict:
        """The content of the shell reply to ``msg_id`` (replies to the readiness probes' kernel-info requests, sent
        while the kernel started, may come first)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)  # a shutdown request, as nbclient sends
        else:  # it ended on its own: its control socket is still open (and would block zmq's context at exit)
            self.km.cleanup_resources()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(fork_servers):
    """The kernels' fork server of this test worker (conftest.py), started as a run starts its own; one of this module's
    own where the worker has none."""
    if "kernels" in fork_servers:
        yield fork_servers["kernels"]
        return
    with ForkServer(KERNEL_ARGS, KERNEL_ENV) as own:
        yield own


def test_each_kernel_is_a_fresh_child_of_the_server_with_the_launchers_environment_and_directory(server, tmp_path):
    first = Kernel(server, str(tmp_path), env={"SAGECHECK_PROBE": "one"})
    try:
        text, _ = first.run(PROBE + "\nleft_behind = 1")
        pid, ppid, cwd, preloaded, probe, tqdm = text.split()
        assert int(ppid) == server._process.pid and int(pid) != first.launcher.pid  # forked by the server, not Jupyter
        assert cwd == str(tmp_path) and preloaded == "True" and probe == "one" and tqdm == "1"  # KERNEL_ENV too
    finally:
        first.close()
    assert first.launcher.wait(timeout=10) == 0 and not alive(int(pid))
    second = Kernel(server, str(ROOT), env={"SAGECHECK_PROBE": "two"})
    try:
        text, reply = second.run(PROBE + "\nleft_behind")
        assert text.split()[4] == "two" and int(text.split()[0]) != int(pid)
        assert reply["status"] == "error" and reply["ename"] == "NameError"  # nothing of the first kernel is left
    finally:
        second.close()


def test_an_interrupt_reaches_the_kernel_and_its_exit_status_comes_back(server, tmp_path):
    k = Kernel(server, str(tmp_path))
    try:
        # stop_on_error off: else ipykernel aborts a request that comes in just after this cell's error (on CI the next
        # cell printed nothing; in a local full run its reply read 'aborted')
        sent = k.kc.execute("import time; time.sleep(60)", stop_on_error=False)
        time.sleep(1)
        started = time.monotonic()
        k.km.interrupt_kernel()  # SIGINT to the launcher's process group: relayed to the kernel
        interrupted = k.reply_to(sent, timeout=20)
        assert time.monotonic() - started < 20 and interrupted["ename"] == "KeyboardInterrupt", interrupted
        # alive and answering: the shell reply carries the expression's value
        _, reply = k.run("answer = 6 * 7", user_expressions={"answer": "answer"})
        assert reply["status"] == "ok" and reply["user_expressions"]["answer"]["data"]["text/plain"] == "42", reply
        k.kc.execute("import os; os._exit(3)")
        assert k.launcher.wait(timeout=20) == 3
    finally:
        k.close()


def test_a_killed_launcher_takes_its_kernel_along(server, tmp_path):
    k = Kernel(server, str(tmp_path))
    try:
        pid = int(k.run(PROBE)[0].split()[0])
        os.kill(k.launcher.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        k.close()


RUNNER = """
import sys, time
from tests.test_forkserver import Kernel
from sagecheck.forkserver import ForkServer
from sagecheck.run import KERNEL_ARGS, KERNEL_ENV

server = ForkServer(KERNEL_ARGS, KERNEL_ENV)
k = Kernel(server, sys.argv[1])
k.kc.execute("import os, time; print(os.getpid(), flush=True); time.sleep(600)")
while True:
    msg = k.kc.get_iopub_msg(timeout=60)
    if msg["msg_type"] == "stream":
        print(server._process.pid, k.launcher.pid, msg["content"]["text"].strip(), flush=True)
        break
time.sleep(600)
"""


def test_a_killed_runner_leaves_no_server_and_no_kernel_behind(tmp_path):
    """The runner killed outright (no clean-up of its own): its server, launcher and the kernel in the middle of a cell
    all end, as a plain kernel ends with its parent."""
    import subprocess

    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in runner.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids), pids
    finally:
        runner.kill()
        runner.wait()
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "left running: server, launcher, kernel"


def test_where_forking_is_unsafe_the_kernels_start_on_their_own(tmp_path, capfd):
    """A module run at the server's start uses torch's OpenMP threads: the server's trial fork hangs, the server says
    why and stops, and the launcher starts a plain kernel."""
    if (os.environ.get("OMP_NUM_THREADS") or "1") == "1":
        pytest.skip("one OpenMP thread: no thread pool, nothing to go wrong")
    with ForkServer(KERNEL_ARGS, KERNEL_ENV, preload=("torch", PARALLEL_AT_IMPORT), trial_timeout_s=2) as unsafe:
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        unsafe.kernel_env = {**KERNEL_ENV, **env}
        k = Kernel(unsafe, str(tmp_path))
        try:
            pid, ppid, *_ = k.run(PROBE)[0].split()
            assert int(pid) == k.launcher.pid  # the launcher became the kernel
        finally:
            k.close()
        assert unsafe._process.wait(timeout=60) == 0
    err = capfd.readouterr().err
    assert "each notebook's kernel starts on its own (a forked trial of torch's parallel code did not finish in 2 s)" in err


def test_the_launcher_alone_says_how_it_is_used():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "sagecheck.forkserver"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


def test_another_target_is_forked_with_the_launchers_python_path_and_exit_status(tmp_path):
    """What the tests' stand-in SGLang servers use: a target module's ``main()`` forked in place of ``python -m TARGET``,
    finding modules that only the launcher's PYTHONPATH names; without a server the launcher runs the target itself."""
    import subprocess

    extra = tmp_path / "site"
    extra.mkdir()
    (extra / "only_on_the_launchers_path.py").write_text("")
    env = {**os.environ, "SAGECHECK_PROBE": "three",
           "PYTHONPATH": os.pathsep.join([str(extra), str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def launch(socket_path: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        cmd = [sys.executable, "-m", "sagecheck.forkserver", "launch", socket_path, "tests.forkserver_target",
               "only_on_the_launchers_path", "7"]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return done, done.stdout.split()

    with ForkServer([], {}, preload=("torch",), target="tests.forkserver_target", what="probe") as server:
        server.start()
        done, (pid, ppid, cwd, preloaded, found, probe) = launch(server.path)
        assert done.returncode == 7, done.stderr
        assert int(ppid) == server._process.pid and preloaded == "True"  # forked by the server that imported torch
        assert found == "True" and probe == "three" and cwd == str(tmp_path)
    done, (pid, ppid, cwd, preloaded, found, probe) = launch(str(tmp_path / "no-server"))
    assert done.returncode == 7 and preloaded == "False" and found == "True" and probe == "three"

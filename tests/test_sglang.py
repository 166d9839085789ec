"""The SGLang engine: command lines, the server lifecycle and the client against a stand-in server.

SGLang cannot be installed here (it pins its own torch and needs CUDA kernels): the
stand-in in tests/standin/sglang answers ``python -m sglang.launch_server`` with the
same command line, endpoints and response shapes, computed by the built-in model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sagecheck import models
from sagecheck.engines.sglang import SGLangEngine, launch_spec
from sagecheck.engines.sglang.client import SGLangClient
from sagecheck.engines.sglang.server import LaunchSpec, Server, ServerError, free_port
from sagecheck.params import load_params
from tests.conftest import ROOT, run_cli

STANDIN = ROOT / "tests" / "standin"
SGLANG_PARAMS = ROOT / "tests" / "params_sglang.yaml"


@pytest.fixture(autouse=True)
def standin_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STANDIN), str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]))


def params(*overrides):
    return load_params(SGLANG_PARAMS, list(overrides))


def no_server_left(pid: int) -> bool:
    if not psutil.pid_exists(pid):
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------ command lines


def test_command_line_default_case(tmp_path):
    p = params()
    cmd = launch_spec(p, "sage_attn", tmp_path).command()
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == str(models.builtin_path())
    assert cmd[cmd.index("--attention-backend") + 1] == "sage_attn"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[cmd.index("--random-seed") + 1] == "0"
    for absent in ("--tp", "--mem-fraction-static", "--disable-cuda-graph", "--context-length", "--load-format"):
        assert absent not in cmd


def test_command_line_every_server_option(tmp_path):
    p = params("dtype=bfloat16", "seed=5", "sglang.tp=2", "sglang.mem_fraction_static=0.7", "sglang.disable_cuda_graph=true",
               "sglang.context_length=4096", "sglang.extra_args=[--chunked-prefill-size, '512']", "sglang.python=/usr/bin/env")
    cmd = launch_spec(p, "fa3", tmp_path).command()
    assert cmd[0] == "/usr/bin/env"
    pairs = {"--dtype": "bfloat16", "--random-seed": "5", "--tp": "2", "--mem-fraction-static": "0.7", "--context-length": "4096"}
    for flag, value in pairs.items():
        assert cmd[cmd.index(flag) + 1] == value
    assert "--disable-cuda-graph" in cmd and cmd[-2:] == ["--chunked-prefill-size", "512"]


def test_command_line_auto_dtype_default_backend_random_weights_and_revision(tmp_path):
    spec = launch_spec(params("dtype=auto"), None, tmp_path)
    assert "--dtype" not in spec.command() and "--attention-backend" not in spec.command()
    random = launch_spec(params("model=random:llama-3.1-8b"), "sage_attn", tmp_path).command()
    folder = Path(random[random.index("--model-path") + 1])
    assert random[random.index("--load-format") + 1] == "dummy"
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 4096 and (folder / "tokenizer.json").is_file()
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    hub = launch_spec(params(f"model={model_dir}", "revision=abc123"), "fa3", tmp_path).command()
    assert hub[hub.index("--revision") + 1] == "abc123"


def test_backend_names_map_to_sglang_backends(tmp_path):
    engine = SGLangEngine(params(), tmp_path)
    assert engine.backend_name("sdpa") == "fa3"
    assert engine.backend_name("sage-emulated") == "sage_attn"
    assert engine.backend_name("flashinfer") == "flashinfer"


def test_free_port_is_free():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ lifecycle


def spec(backend="sage_attn", **kw):
    return LaunchSpec(model_path=str(models.builtin_path()), attention_backend=backend, dtype="float32", **kw)


def test_start_serve_and_stop_leaves_nothing(tmp_path):
    server = Server(spec(), tmp_path, startup_timeout_s=120)
    with server:
        pid = server.process.pid
        client = SGLangClient(server.url)
        info = client.server_info()
        assert info["attention_backend"] == "sage_attn" and info["max_total_num_tokens"] > 0
        client.flush_cache()
        ids = [1, 300, 301, 302, 303, 304]
        lp = client.input_logprobs([ids, ids[:4]])
        assert [len(x) for x in lp] == [5, 3] and all((x < 0).all() for x in lp)
        values, indices = client.top_logprobs(ids, 5)
        assert values.shape == (6, 5) and (values[:, 0] >= values[:, 1]).all()
        assert len(client.greedy([ids], 3)[0]) == 3
    assert server.log_path.read_text().startswith("$ ")
    assert no_server_left(pid)


def test_a_server_that_crashes_on_start(tmp_path):
    server = Server(spec(), tmp_path, startup_timeout_s=60, env={"SAGECHECK_STANDIN_MODE": "crash"})
    with pytest.raises(ServerError, match=r"exited with code 1 before it was ready(.|\n)*simulated failure while loading"):
        server.start()
    assert server.process is None or no_server_left(server.process.pid)


def test_a_server_that_never_becomes_ready(tmp_path):
    server = Server(spec(), tmp_path, startup_timeout_s=4, env={"SAGECHECK_STANDIN_MODE": "hang"})
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="was not ready after 4 s; it was stopped"):
        server.start()
    assert time.monotonic() - t0 < 30
    assert server.process is None


def test_a_server_that_dies_mid_run(tmp_path):
    engine = SGLangEngine(params(), tmp_path, env={"SAGECHECK_STANDIN_MODE": "die-after:1"})
    with pytest.raises(ServerError, match=r"died with code 1(.|\n)*simulated crash in the scheduler"):
        with engine.backend("sage-emulated") as b:
            pid = b.server.process.pid
            b.generate([[1, 300, 301]], 2)
            b.generate([[1, 300, 301]], 2)
    assert no_server_left(pid)


def test_an_unknown_backend_gives_sglangs_own_error(tmp_path):
    with pytest.raises(ServerError, match="invalid choice: 'no_such_backend'"):
        Server(spec("no_such_backend"), tmp_path, startup_timeout_s=60).start()


def test_an_exception_inside_the_block_stops_the_server(tmp_path):
    engine = SGLangEngine(params(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with engine.backend("sdpa") as b:
            pid = b.server.process.pid
            raise KeyboardInterrupt  # what an interrupted notebook cell raises
    assert no_server_left(pid)


def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    script = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, %r)\n"
        "from sagecheck.engines.sglang.server import LaunchSpec, Server\n"
        "from sagecheck import models\n"
        "s = Server(LaunchSpec(model_path=str(models.builtin_path()), attention_backend='fa3'), Path(%r), 120).start()\n"
        "print(s.process.pid, flush=True); time.sleep(600)\n"
    ) % (str(ROOT / "lib"), str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(server_pid)
    parent.send_signal(signal.SIGKILL)  # no clean-up code runs in the parent
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not no_server_left(server_pid):
        time.sleep(0.2)
    assert no_server_left(server_pid)


def test_attach_to_running_servers(tmp_path):
    with Server(spec("sage_attn"), tmp_path, 120) as cand, Server(spec("fa3"), tmp_path, 120) as base:
        engine = SGLangEngine(params(f"sglang.url={cand.url}", f"sglang.baseline_url={base.url}"), tmp_path)
        with engine.backend("sage-emulated") as b:
            assert b.info["attention_backend"] == "sage_attn" and b.server is None
        with engine.backend("sdpa") as b:
            assert b.info["attention_backend"] == "fa3"
        alone = SGLangEngine(params(f"sglang.url={cand.url}"), tmp_path)
        with pytest.raises(ServerError, match="needs a running server for the baseline"):
            with alone.backend("sdpa"):
                pass


# ------------------------------------------------------------------ the notebooks on engine: sglang


@pytest.mark.slow
def test_notebooks_on_the_sglang_engine(tmp_path, ci_run):
    out = tmp_path / "sglang"
    done = run_cli("run", "--params", str(SGLANG_PARAMS), "--only", "01,02,03,04,05,06,07", "--out", str(out), "-q",
                   env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    manifest = json.loads((out / "run.json").read_text())
    assert {n["name"]: n["status"] for n in manifest["notebooks"]} == {
        f"0{i}_{n}": "ok" for i, n in enumerate(["", "runtime_flag", "logits", "perplexity", "throughput", "memory",
                                                 "activation_drift", "context_length"]) if i} | {"99_summary": "ok"}, done.stderr[-3000:]
    from sagecheck import results as R

    flag = {r["implementation"]: r for r in R.load(out / "results" / "01_runtime_flag.json").tables["implementations"]}
    assert flag["sage-emulated"]["attention_backend_reported"] == "sage_attn" and flag["sage-emulated"]["generated_tokens"] == 4
    assert "invalid choice: 'no_such_backend'" in flag["no_such_backend"]["error"]
    logits = R.load(out / "results" / "02_logits.json").metrics["overall"]
    assert logits["positions"] == 2 * 100 + 600 and 0 < logits["kl_mean"] < 1e-2
    # the same perplexity as the in-process engine on the same model and text
    hf = R.load(ci_run[1] / "results" / "03_perplexity.json").metrics["perplexity"]
    sg = R.load(out / "results" / "03_perplexity.json").metrics["perplexity"]
    for impl in ("sdpa", "sage-emulated"):
        assert sg[impl] == pytest.approx(hf[impl], rel=1e-4)
    t = R.load(out / "results" / "04_throughput.json").tables["throughput"]
    assert all(r["status"] == "ok" and r["prefill_tok_s"] > 0 for r in t)
    mem = R.load(out / "results" / "05_memory.json")
    assert [r["attention_backend"] for r in mem.tables["sglang_memory"]] == ["fa3", "sage_attn"]
    drift = R.load(out / "results" / "06_activation_drift.json")
    assert any("hf engine" in n for n in drift.notes) and drift.metrics["final_hidden"]["rel_l2_max"] > 0
    ctx = R.load(out / "results" / "07_context_length.json")
    assert [r["length"] for r in ctx.tables["passkey_by_length"]] == [128, 256]
    logs = list((out / "logs").glob("sglang-*.log"))
    assert len(logs) >= 10
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "sglang.launch_server" in " ".join(p.info["cmdline"] or [])
                 and str(out) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


@pytest.mark.slow
def test_a_crashing_server_fails_its_notebooks_and_the_run_goes_on(tmp_path):
    out = tmp_path / "crash"
    done = run_cli("run", "--params", str(SGLANG_PARAMS), "--only", "00,03,06", "--out", str(out), "-q",
                   env={"PYTHONPATH": os.environ["PYTHONPATH"], "SAGECHECK_STANDIN_MODE": "crash"})
    assert done.returncode == 1
    statuses = {n["name"]: n["status"] for n in json.loads((out / "run.json").read_text())["notebooks"]}
    assert statuses == {"00_environment": "ok", "03_perplexity": "failed", "06_activation_drift": "ok", "99_summary": "ok"}
    assert "simulated failure while loading the model" in done.stderr
    html = (out / "report.html").read_text()
    assert "03_perplexity FAILED" in html and "exited with code 1 before it was ready" in html
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "sglang.launch_server" in " ".join(p.info["cmdline"] or [])
                 and str(out) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers

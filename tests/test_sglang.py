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

import numpy as np
import psutil
import pytest

from sagecheck import models
from sagecheck.engines.sglang import SGLangEngine, launch_spec
from sagecheck.engines.sglang.client import ClientError, SGLangClient
from sagecheck.engines.sglang.server import LaunchSpec, Server, ServerError, free_port
from sagecheck.params import load_params
from tests.conftest import ROOT, SECTION_OVERFLOW_JS, report_page, run_cli
from tests.standin.forked import unforked

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


def test_labels_are_sglangs_backend_names(tmp_path):
    engine = SGLangEngine(params(), tmp_path)
    assert engine.pair == ("fa3", "sage_attn") and engine.copy == "fa3 copy"
    assert [engine.role(x) for x in ("fa3", "sage_attn", "fa3 copy", "flashinfer")] == ["baseline", "candidate", "baseline_copy", None]
    assert engine.backend_name("fa3 copy") == "fa3" and engine.backend_name("flashinfer") == "flashinfer"
    aa = SGLangEngine(params("sglang_attention_backend=fa3"), tmp_path)  # an A/A run: one name, two roles
    assert aa.pair == ("fa3", "fa3 (candidate)") and aa.backend_name("fa3 (candidate)") == "fa3"


def test_free_port_is_free():
    import socket

    ports = [free_port() for _ in range(50)]
    for port in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    # SGLang's gRPC port is --port + 10000 and must stay below 65536 (a port of 58331 failed the start on the H100)
    assert all(20000 <= p < 55000 for p in ports)


# ------------------------------------------------------------------ lifecycle


def spec(backend="sage_attn", **kw):
    return LaunchSpec(model_path=str(models.builtin_path()), attention_backend=backend, dtype="float32", **kw)


def test_start_serve_and_stop_leaves_nothing(tmp_path, monkeypatch):
    unforked(monkeypatch)  # the server's own process is what this test is about
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


def test_a_server_that_dies_mid_run(tmp_path, monkeypatch):
    unforked(monkeypatch)  # the server's own process is what this test is about
    engine = SGLangEngine(params(), tmp_path, env={"SAGECHECK_STANDIN_MODE": "die-after:1"})
    with pytest.raises(ServerError, match=r"died with code 1(.|\n)*simulated crash in the scheduler"):
        try:
            with engine.backend("sage_attn") as b:
                pid = b.handle.pid
                b.generate([[1, 300, 301]], 2)
                b.generate([[1, 300, 301]], 2)
        finally:
            engine.close()
    assert no_server_left(pid)


def test_an_unknown_backend_gives_sglangs_own_error(tmp_path):
    with pytest.raises(ServerError, match="invalid choice: 'no_such_backend'"):
        Server(spec("no_such_backend"), tmp_path, startup_timeout_s=60).start()


def test_the_engine_keeps_its_servers_until_close_even_after_an_exception(tmp_path, monkeypatch):
    unforked(monkeypatch)  # the server's own process is what this test is about
    engine = SGLangEngine(params(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        try:
            with engine.backend("fa3") as b:
                pid = b.handle.pid
                raise KeyboardInterrupt  # what an interrupted notebook cell raises
        finally:
            assert psutil.pid_exists(pid) and not no_server_left(pid)  # one server per role, reused by the next block
            engine.close()
    assert no_server_left(pid)


def test_the_server_dies_with_the_process_that_started_it(tmp_path, monkeypatch):
    unforked(monkeypatch)  # the server's own process is what this test is about
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
        with engine.backend("sage_attn") as b:
            assert b.info["attention_backend"] == "sage_attn" and b.handle.pid is None
        with engine.backend("fa3") as b:
            assert b.info["attention_backend"] == "fa3"
        alone = SGLangEngine(params(f"sglang.url={cand.url}"), tmp_path)
        with pytest.raises(ServerError, match="needs a running server for the baseline"):
            with alone.backend("fa3"):
                pass
        with pytest.raises(ServerError, match=r"a second baseline \(A/A control\) too.*aa_control=false"):
            engine.handle("baseline_copy")


# ------------------------------------------------------------------ the run's server set, the plugin, streaming


def test_the_roles_a_run_needs():
    from sagecheck.engines.sglang.servers import needed_roles

    assert needed_roles(params(), ["00_environment", "04_throughput", "99_summary"]) == ["baseline", "candidate", "baseline_copy"]
    assert needed_roles(params("throughput.aa_control=false"), ["02_logits"]) == ["baseline", "candidate"]
    assert needed_roles(params(), ["02_logits"]) == ["baseline", "candidate"]
    assert needed_roles(params(), ["00_environment", "06_activation_drift", "08_kernel"]) == []
    assert needed_roles(params("engine=hf"), ["02_logits"]) == []
    assert needed_roles(params("sglang.url=http://x:1", "sglang.baseline_url=http://x:2"), ["02_logits"]) == []


def test_a_server_set_starts_matched_servers_side_by_side_and_stops_them(tmp_path):
    from sagecheck.engines.sglang.servers import ServerSet, stepped_fraction

    assert [stepped_fraction(i) for i in (1, 2, 3)] == [0.283, 0.567, 0.85]
    assert stepped_fraction(3, 0.5) == 0.92  # never the whole GPU
    p = params("sglang.max_total_tokens=5000", "sglang.sage_attn_decode=sage")
    with ServerSet(p, tmp_path, ["baseline", "candidate", "baseline_copy"]) as servers:
        handles = servers.as_dicts()
        pids = [h["pid"] for h in handles.values()]
        assert [h["attention_backend"] for h in handles.values()] == ["fa3", "sage_attn", "fa3"]
        assert [h["mem_fraction_static"] for h in handles.values()] == [0.85] * 3  # capped KV: started at once
        assert list(handles) == ["baseline", "candidate", "baseline_copy"]
        infos = [SGLangClient(h["url"]).server_info() for h in handles.values()]
        assert [i["max_total_num_tokens"] for i in infos] == [5000] * 3
        assert handles["candidate"]["env"] == {"SAGE_ATTN_DECODE": "sage", "SAGE_ATTN_PREFILL": "auto",
                                               "SAGE_ATTN_DISPATCH": "measured",
                                               "SAGE_ATTN_STATS_DIR": str(tmp_path / "sage_attn-stats-candidate")}
        commands = [Path(h["log"]).read_text().splitlines()[0].split() for h in handles.values()]

        def without(cmd, *flags):  # the command line less the values that must differ
            return [a for i, a in enumerate(cmd) if a not in flags and (i == 0 or cmd[i - 1] not in flags)]

        varying = ("--port", "--attention-backend")
        assert without(commands[0], *varying) == without(commands[1], *varying) == without(commands[2], *varying)
        # the candidate measures its dispatch rule at start: it was launched first and the others once it had measured
        assert handles["candidate"]["measured_alone_s"] > 0 and handles["baseline"]["measured_alone_s"] is None
        started = {role: process_start_ticks(h["pid"]) for role, h in handles.items()}
        assert started["candidate"] < started["baseline"] and started["candidate"] < started["baseline_copy"]
    assert all(no_server_left(pid) for pid in pids)


def process_start_ticks(pid: int) -> int:
    """When a process started, in clock ticks since boot (Linux's /proc/PID/stat, field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_without_a_kv_cap_the_servers_start_one_after_the_other_with_stepped_fractions(tmp_path):
    from sagecheck.engines.sglang.servers import ServerSet

    with ServerSet(params(), tmp_path, ["baseline", "candidate"]) as servers:
        handles = servers.as_dicts()
        assert [h["mem_fraction_static"] for h in handles.values()] == [0.283, 0.567]
        assert all(h["url"] for h in handles.values())


def test_a_role_that_fails_to_start_is_recorded_and_the_others_run(tmp_path):
    from sagecheck.engines.sglang.servers import ServerSet

    p = params("sglang_attention_backend=no_such_backend")
    with ServerSet(p, tmp_path, ["baseline", "candidate"]) as servers:
        h = servers.as_dicts()
        assert h["baseline"]["url"] and h["candidate"]["url"] is None
        assert "invalid choice: 'no_such_backend'" in h["candidate"]["error"]
        engine = SGLangEngine(p, tmp_path, servers=h)
        with pytest.raises(ServerError, match="invalid choice: 'no_such_backend'"):
            with engine.backend(engine.candidate):
                pass
        with engine.backend("fa3") as b:
            assert b.info["attention_backend"] == "fa3"


def test_sage_attn_is_a_choice_only_where_the_plugin_is_loaded(tmp_path):
    ok = Server(spec("sage_attn"), tmp_path, 120)
    with ok:
        assert SGLangClient(ok.url).server_info()["attention_backend"] == "sage_attn"
    refused = Server(spec("sage_attn"), tmp_path, 60, env={"SGLANG_PLUGINS": "some_other_plugin"})
    with pytest.raises(ServerError) as e:
        refused.start()
    assert "error: argument --attention-backend: invalid choice: 'sage_attn'" in e.value.cause


def test_sage_attn_refuses_to_start_where_sageattention_cannot_be_imported(tmp_path):
    from sagecheck.engines.sglang.flag import hidden_sageattention

    shadow = hidden_sageattention(tmp_path / "shadow")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ["PYTHONPATH"]])}
    with pytest.raises(ServerError) as e:
        Server(spec("sage_attn"), tmp_path, 60, env=env).start()
    assert "sage_attn: the sageattention package cannot be imported" in e.value.cause
    assert "--attention-backend triton" in e.value.cause  # and what to use instead
    with Server(spec("fa3"), tmp_path, 60, env=env) as baseline:  # the baseline does not need it
        assert SGLangClient(baseline.url).server_info()["attention_backend"] == "fa3"


def test_the_default_backend_is_resolved_the_same_with_and_without_the_plugin(tmp_path):
    from sagecheck.engines.sglang.flag import NO_PLUGINS, resolve_default

    with_plugin = resolve_default(params(), tmp_path, {})
    without = resolve_default(params(), tmp_path, {"SGLANG_PLUGINS": NO_PLUGINS})
    assert with_plugin["attention_backend"] == without["attention_backend"] == "flashinfer"
    assert with_plugin["sage_attn_is_a_choice"] and not without["sage_attn_is_a_choice"]


def test_the_candidate_writes_the_plugins_statistics(tmp_path):
    engine = SGLangEngine(params("sglang.sage_attn_decode=sage"), tmp_path)
    try:
        with engine.backend("sage_attn") as b:
            b.generate([[1, 300, 301], [1, 5, 6, 7]], 3)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (b.plugin_stats() or {}).get("counts"):
                time.sleep(0.2)
            stats = b.plugin_stats()
        assert stats["config"]["decode"] == "sage" and stats["counts"]["extend_batches_kernel"] == 1
        assert stats["counts"]["decode_batches_kernel"] == 2
        text = engine.candidate_ran()
        assert "1 prefill batches on the kernel" in text and "decode on the sageattention kernel" in text
    finally:
        engine.close()


def test_heads_per_rank_of_a_tensor_parallel_candidate(tmp_path):
    """--tp 2 on the stand-in: one statistics file per rank, each with half the heads; the check of 01 reads them."""
    from sagecheck.engines.sglang.flag import heads_per_rank

    p = params("sglang.tp=2")
    engine = SGLangEngine(p, tmp_path)
    try:
        with engine.backend("sage_attn") as b:
            b.generate([[1, 300, 301]], 2)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (b.plugin_stats() or {}).get("counts"):
                time.sleep(0.2)
            stats = b.plugin_stats()
    finally:
        engine.close()
    row = heads_per_rank(engine, stats)
    assert row["passed"] and row["reported"] == "rank 0: 4/1 of tp 2; rank 1: 4/1 of tp 2"
    assert stats["counts"]["extend_batches_kernel"] == 1  # one batch, run by both ranks
    assert not heads_per_rank(SGLangEngine(params("sglang.tp=4"), tmp_path), stats)["passed"]


def test_more_tensor_parallel_ranks_than_gpus_is_refused_in_one_line():
    from sagecheck.engines.sglang.servers import check_tensor_parallel
    from sagecheck.params import ParamError

    with pytest.raises(ParamError, match=r"parameter 'sglang.tp' = 2: tensor parallelism over 2 GPUs, but this machine shows 1 .*"
                                         r"use sglang.tp <= 1"):
        check_tensor_parallel(2, 1)
    check_tensor_parallel(2, 2)
    check_tensor_parallel(2, None)  # no CUDA in this process (the stand-in): SGLang decides


def test_a_streamed_request_is_timed_to_the_last_first_token_and_to_the_end(tmp_path):
    with Server(spec("fa3"), tmp_path, 120) as server:
        client = SGLangClient(server.url)
        ttft, total = client.streamed_timing([[1, 300, 301, 302], [1, 7, 8]], 5)
        assert 0 < ttft <= total
        with pytest.raises(ClientError, match="answered 400"):
            client.streamed_timing([[1, 300, 10**6]], 2)  # an id outside the vocabulary


def test_log_cause_prefers_the_plugins_refusal_then_argparse_then_the_last_exception():
    from sagecheck.engines.sglang.server import log_cause

    assert log_cause("x\nValueError: early\nRuntimeError: late\n") == "RuntimeError: late"
    assert log_cause("launch_server: error: argument --attention-backend: invalid choice: 'x'\n") == (
        "error: argument --attention-backend: invalid choice: 'x'")
    assert log_cause("sagecheck.sglang_plugin.settings.SageAttnUnavailable: sage_attn: no GPU\nRuntimeError: child died") == (
        "sage_attn: no GPU")
    assert log_cause("all fine\n") is None


def test_speedups_are_judged_against_the_aa_interval():
    import numpy as np

    from sagecheck.metrics.serving import classify
    from sagecheck.metrics.timing import Samples

    aa = Samples(np.array([0.97, 0.99, 1.0, 1.01, 1.03]), "x")
    assert classify(Samples(np.array([1.10, 1.12, 1.15, 1.2, 1.11]), "x"), aa) == "faster"
    assert classify(Samples(np.array([0.8, 0.85, 0.82, 0.84, 0.83]), "x"), aa) == "slower"
    assert classify(Samples(np.array([1.02, 1.05, 1.0, 1.04, 1.03]), "x"), aa) == "no difference"
    assert classify(Samples(np.array([1.5] * 5), "x"), None) == "no A/A control"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_each_server_runs_in_each_position_and_after_each_other_equally_often(n):
    from collections import Counter

    from sagecheck.metrics.serving import balanced_orders

    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 and n > 1 else n) and all(sorted(o) == list(range(n)) for o in orders)
    positions = Counter((i, server) for o in orders for i, server in enumerate(o))
    assert len(set(positions.values())) == 1 and len(positions) == n * n
    after = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    # every ordered pair, as often as any other (the cyclic rotation it replaces ran the candidate, 1, right after the
    # baseline, 0, in two repeats of three and the A/A copy, 2, never: the control did not share its neighbours)
    assert len(set(after.values())) <= 1 and len(after) == n * (n - 1)


def test_the_sglang_sweep_measures_three_servers_interleaved(tmp_path):
    from sagecheck.metrics import serving as ST

    engine = SGLangEngine(params(), tmp_path)
    try:
        rows, served = ST.sweep(engine, [16, 600], [1, 2], 3, 5, 1, 0, aa_control=True, max_batch_tokens=1000)
    finally:
        engine.close()
    assert set(served["servers"]) == {"fa3", "sage_attn", "fa3 copy"} and "Williams design" in served["order"]
    assert served["orders_balanced"] is False and "5 repeats: not a multiple of 6" in served["order"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["input_length"], r["batch"]) for r in ok} == {(16, 1), (16, 2), (600, 1)}
    over = [r for r in rows if r["status"] == "over the token budget"]
    assert {(r["input_length"], r["batch"]) for r in over} == {(600, 2)} and len(over) == 3
    cand = [r for r in ok if r["implementation"] == "sage_attn"]
    assert all(r["prefill_vs_aa"] in ("faster", "slower", "no difference") and r["aa_prefill_speedup"] > 0 for r in cand)
    assert all(r["decode_ms_per_token"] > 0 and r["ttft_ms"] > 0 and r["repeats"] == 5 for r in ok)
    # every timed repeat is kept, in the order run: its median is the row's
    assert all(len(r["ttft_ms_by_repeat"]) == 5 and r["ttft_ms"] == pytest.approx(np.median(r["ttft_ms_by_repeat"]), abs=1e-3)
               and r["decode_ms_per_token"] == pytest.approx(np.median(r["decode_ms_by_repeat"]) / 2, abs=1e-3) for r in ok)
    s = ST.summary(rows, "sage_attn")
    assert s["points"] == 4 and s["points_not_run"] == 1 and s["aa_decode_abs_diff_pct_median"] is not None
    assert s["prefill_points_faster"] + s["prefill_points_slower"] + s["prefill_points_no_difference"] == 3


def test_the_sweep_says_where_the_candidates_prefill_ran(tmp_path):
    """SAGE_ATTN_DISPATCH=400 on the stand-in: the plugin's own rule sends the batches of 16-token requests to Triton's
    route and those of 600 tokens to the kernel; each point's row says so from the candidate server's counters."""
    from sagecheck.metrics import serving as ST

    engine = SGLangEngine(params("sglang.sage_attn_dispatch=400"), tmp_path)
    try:
        rows, served = ST.sweep(engine, [16, 600], [1], 3, 5, 1, 0, aa_control=False)
    finally:
        engine.close()
    cand = {r["input_length"]: r for r in rows if r["implementation"] == "sage_attn"}
    # one warm-up and 5 repeats per point: 6 requests, one batch each, two at 600 tokens (chunks of 512)
    assert (cand[16]["prefill_on"], cand[16]["prefill_batches_triton"], cand[16]["prefill_batches_kernel"]) == (
        "Triton (dispatch rule)", 6, 0)
    assert (cand[600]["prefill_on"], cand[600]["prefill_batches_kernel"], cand[600]["prefill_batches_triton"]) == ("kernel", 12, 0)
    assert "prefill_on" not in next(r for r in rows if r["implementation"] == "fa3")
    assert served["dispatch"] == {"rule": "the kernel from 400 keys per request (SAGE_ATTN_DISPATCH=400)", "measured_alone_s": None,
                                  "measured": {"mode": "set", "keys": 400, "source": "SAGE_ATTN_DISPATCH=400", "lengths": [],
                                               "kernel_ms": [], "triton_ms": [], "kernel_alone_ms": [], "error": "", "timing": "",
                                               "prefix_measured": False, "prefix_keys": None, "prefix_kernel_ms": [],
                                               "prefix_triton_ms": [], "kernel_device_ms": [], "kernel_alone_device_ms": [],
                                               "device_timing": "", "routes": []}}
    s = ST.summary(rows, "sage_attn")
    assert (s["prefill_points_routed"], s["prefill_points_on_kernel"], s["prefill_points_on_triton"]) == (2, 1, 1)


@pytest.mark.slow
def test_04_shows_the_candidates_measurement_at_start_and_follows_it(tmp_path):
    """The stand-in measures its crossover at start as the plugin does, on the CPU (the plugin's varlen path on the
    emulation, the emulation alone, SDPA for Triton): 04 shows the measurement as a table and a figure, gives CPU
    timings no verdict, and each point's route follows the crossover measured."""
    import nbformat

    from sagecheck import results as R

    out = tmp_path / "measured"
    done = run_cli("run", "--params", str(SGLANG_PARAMS), "--only", "04", "-p", "sglang.sage_attn_dispatch=measured",
                   "--out", str(out), "-q", env={"PYTHONPATH": os.environ["PYTHONPATH"], "SAGECHECK_STANDIN_DISPATCH": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    t = R.load(out / "results" / "04_throughput.json")
    measured = t.metrics["dispatch"]["measured"]
    assert measured["mode"] == "measured" and measured["lengths"] == [16, 32, 64, 128, 256]
    assert "CPU timings" in measured["timing"] and measured["source"].startswith("measured at start: stand-in on a CPU")
    rows = t.tables["dispatch"]
    assert len(rows) == 5 and all(r["kernel_path_ms"] > 0 and r["bare_kernel_ms"] > 0 and r["triton_ms"] > 0 for r in rows)
    # and requests whose first half is a cached prefix, with their own crossover and route: wherever the rule sends one
    # to the kernel, the kernel path measured no slower than Triton's there (the crossover's definition)
    assert measured["prefix_measured"] and all(r["prefix_kernel_path_ms"] > 0 and r["prefix_triton_ms"] > 0 for r in rows)
    assert all(r["prefix_kernel_path_ms"] <= r["prefix_triton_ms"] for r in rows if r["prefix_sent_to"] == "kernel")
    assert all(r["kernel_path_ms"] <= r["triton_ms"] for r in rows if r["sent_to"] == "kernel")
    assert t.find("throughput.integration") is None  # CPU timings: a note at most, never a verdict
    keys = measured["keys"]
    for r in (r for r in t.tables["throughput"] if r["implementation"] == "sage_attn"):
        want = "kernel" if keys is not None and r["input_length"] >= keys else "Triton (dispatch rule)"
        assert r["prefill_on"] == want, (r["input_length"], keys)
    nb = nbformat.read(out / "notebooks" / "04_throughput.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.get("id") == "dispatch-rule")
    assert [o for o in cell.outputs if "image/png" in o.get("data", {})] and "measurement for its dispatch rule" in str(cell.outputs)


# ------------------------------------------------------------------ the notebooks on engine: sglang


@pytest.mark.slow
def test_notebooks_on_the_sglang_engine(tmp_path, builtin):
    out = tmp_path / "sglang"
    done = run_cli("run", "--params", str(SGLANG_PARAMS), "--only", "01,02,03,04,05,06,07,09,10", "--out", str(out), "-q",
                   env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    manifest = json.loads((out / "run.json").read_text())
    assert {n["name"]: n["status"] for n in manifest["notebooks"]} == {
        f"0{i}_{n}": "ok" for i, n in enumerate(["", "runtime_flag", "logits", "perplexity", "throughput", "memory",
                                                 "activation_drift", "context_length"]) if i} | {
        "09_tasks": "ok", "10_code_paths": "ok", "99_summary": "ok"}, done.stderr[-3000:]
    from sagecheck import results as R

    flag = R.load(out / "results" / "01_runtime_flag.json")
    checks = {r["check"]: r for r in flag.tables["sglang_checks"]}
    assert all(r["passed"] for r in checks.values()) and all(v.passed for v in flag.verdicts) and len(flag.verdicts) == 7
    assert {v.id for v in flag.verdicts} == {"runtime_flag.serves.baseline.fa3", "runtime_flag.serves.candidate.sage_attn",
                                             "runtime_flag.heads_per_rank", "runtime_flag.refused.plugin_not_loaded",
                                             "runtime_flag.refused.no_sageattention", "runtime_flag.refused.no_such_backend",
                                             "runtime_flag.default_backend"}
    heads = checks["sage_attn: heads per tensor-parallel rank"]  # the built-in model: 8 query / 2 KV heads
    assert heads["reported"] == "rank 0: 8/2 of tp 1" and heads["expected"].startswith("1 rank(s), 8 query / 2 KV")
    cand = checks["--attention-backend sage_attn (candidate)"]
    assert cand["reported"] == "sage_attn" and cand["generated_tokens"] == 4 and cand["kernel_prefill_batches"] >= 1
    assert "invalid choice: 'sage_attn'" in checks["sage_attn with the plugin not loaded (SGLANG_PLUGINS=__sagecheck_none__)"]["error"]
    assert "sage_attn: the sageattention package cannot be imported" in checks["sage_attn where sageattention cannot be imported"]["error"]
    assert checks["default backend (no --attention-backend), resolved by SGLang"]["reported"] == "with plugin: flashinfer, without: flashinfer"
    assert "invalid choice: 'no_such_backend'" in checks["--attention-backend no_such_backend"]["error"]
    logits = R.load(out / "results" / "02_logits.json").metrics["overall"]
    assert logits["positions"] == 2 * 100 + 600 and 0 < logits["kl_mean"] < 1e-2
    # the same perplexity as the in-process engine on the same model, text and windows
    from sagecheck.data import corpus
    from sagecheck.metrics import perplexity as ppl

    ids = builtin.tokenizer(corpus.load_text("builtin").text).input_ids[:1500]
    windows = ppl.sliding_windows(len(ids), 256, 128)
    sg = R.load(out / "results" / "03_perplexity.json").metrics["perplexity"]
    for sglang_name, hf_name in (("fa3", "sdpa"), ("sage_attn", "sage-emulated")):  # each keyed by its engine's own name
        with builtin.backend(hf_name) as b:
            assert sg[sglang_name] == pytest.approx(ppl.score_windows(ids, windows, b.token_logprobs).perplexity, rel=1e-4)
    t = R.load(out / "results" / "04_throughput.json")
    assert all(r["status"] == "ok" and r["prefill_tok_s"] > 0 for r in t.tables["throughput"])
    assert {r["implementation"] for r in t.tables["throughput"]} == {"fa3", "sage_attn", "fa3 copy"}
    # the A/A figure against its definition, recomputed from the table: median over points of |A/A speedup - 1|, in %
    aa = [abs(r["aa_prefill_speedup"] - 1) * 100 for r in t.tables["throughput"] if r["implementation"] == "sage_attn"]
    assert len(aa) == 4 and t.metrics["aa_prefill_abs_diff_pct_median"] == pytest.approx(float(np.median(aa)))
    assert t.metrics["aa_prefill_abs_diff_pct_median"] >= 0 and any("A/A control (prefill)" in n for n in t.notes)
    assert [s["mem_fraction_static"] for s in t.metrics["servers"]["servers"].values()] == [0.283, 0.567, 0.85]
    # every point's prefill on the (emulated) kernel, by the candidate's counters: 1 warm-up + 6 repeats, one batch each
    assert {(r["prefill_on"], r["prefill_batches_kernel"]) for r in t.tables["throughput"] if r["implementation"] == "sage_attn"} \
        == {("kernel", 7)} and t.metrics["prefill_points_on_kernel"] == 4
    assert t.metrics["servers"]["orders_balanced"] and "6 orders of a Williams design" in t.metrics["servers"]["order"]
    # the stand-in servers run on the CPU: no GPU clocks, and the results say why
    clocks = t.metrics["gpu_clocks"]
    assert clocks["logged"] is False and clocks["why_not"] == "the run is on the CPU, not a GPU" and "gpu_clocks" not in \
        t.metrics["servers"]
    assert t.metrics["dispatch"]["rule"].startswith("every extend batch on the kernel (stand-in") and "dispatch" not in t.tables
    for nb in ("02_logits", "03_perplexity", "04_throughput", "07_context_length", "09_tasks", "10_code_paths"):
        assert "prefill batches on the kernel" in R.load(out / "results" / f"{nb}.json").metrics["candidate_ran"]
    mem = R.load(out / "results" / "05_memory.json")
    assert [r["attention_backend"] for r in mem.tables["sglang_memory"]] == ["fa3", "sage_attn"]
    assert all(r["max_total_num_tokens"] == 8192 and r["weights_GB"] > 0 for r in mem.tables["sglang_memory"])
    drift = R.load(out / "results" / "06_activation_drift.json")
    assert any("not available on this engine (sglang): per-layer activations" in n and "measured in process (hf)" in n
               for n in drift.notes) and drift.metrics["final_hidden"]["rel_l2_max"] > 0
    ctx = R.load(out / "results" / "07_context_length.json")
    assert [r["length"] for r in ctx.tables["passkey_by_length"]] == [128, 256]
    # 09 asks each choice from its question's last context token on, the choices of a question together: the server
    # reuses the context from its prefix cache (the baseline too), and says so
    tasks = R.load(out / "results" / "09_tasks.json")
    reuse = tasks.metrics["context_reuse"]
    assert reuse["sage_attn: line ending"]["requests"] == 24 * 4 and reuse["sage_attn: line ending"]["reused"] >= 24 * 3
    answers = [r for r in tasks.tables["answers"] if r["implementation"] == "sage_attn"]
    assert len(answers) == 24 and all(min(r["cached_tokens"][1:]) > 10 for r in answers)  # the whole context, from the cache
    paths = {r["id"]: r for r in R.load(out / "results" / "10_code_paths.json").tables["paths"]}
    assert all(r["passed"] for r in paths.values() if r["exercised"]) and not paths["tp_ranks"]["exercised"]
    assert {p for p, r in paths.items() if r["exercised"]} == {"cold", "prefix", "chunked", "decode_graphs", "decode_eager", "batch"}
    # the SGLang report's wide tables (04's per phase, 10's) fit a 1400-px page
    with report_page(out, 1400, 1000) as page:
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        problems = {stem: page.evaluate(SECTION_OVERFLOW_JS, stem)["problems"] for stem in ("04_throughput", "10_code_paths")}
        assert not any(problems.values()), problems
    # the run's three servers, started once for every notebook, and 01's three that must not start
    logs = sorted(p.name.rsplit("-", 1)[0] for p in (out / "logs").glob("sglang-*.log"))
    assert logs == ["sglang-baseline-fa3", "sglang-baseline_copy-fa3", "sglang-candidate-sage_attn", "sglang-no_such_backend",
                    "sglang-sage_attn", "sglang-sage_attn"]
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


def test_unreachable_servers_fail_each_notebook_with_the_cause_in_one_line(tmp_path):
    out = tmp_path / "unreachable"
    done = run_cli("run", "--params", str(SGLANG_PARAMS), "-p", "sglang.url=http://127.0.0.1:1", "-p",
                   "sglang.baseline_url=http://127.0.0.1:2", "-p", "throughput.aa_control=false", "--only", "02,04,05",
                   "--out", str(out), "-q", "--no-report", env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert done.returncode == 1
    failed = {ln.split(":", 1)[0][len("FAILED "):]: ln for ln in done.stderr.splitlines() if ln.startswith("FAILED ")}
    assert set(failed) == {"02_logits", "04_throughput", "05_memory"}, done.stderr[-2000:]
    assert all("127.0.0.1:2" in ln and "KeyError" not in ln for ln in failed.values())


def test_a_server_that_stalls_answers_500_or_malformed_json_is_one_line(tmp_path):
    """After it was ready: a request that never gets its answer (the request timeout), HTTP 5xx, a reply that is not JSON.
    Each is a ClientError of one line (a notebook ends with it and the run goes on, as for a server that died)."""
    faults = {"stall-after:0": r"failed: .*(timed out|Read timed out)", "http500-after:0": "answered 500",
              "badjson-after:0": "answered malformed JSON"}
    servers = {mode: Server(spec("fa3"), tmp_path / mode.split("-")[0], 120, env={"SAGECHECK_STANDIN_MODE": mode})
               for mode in faults}
    try:
        for server in servers.values():
            server.launch()
        for mode, expected in faults.items():
            servers[mode].wait_ready()
            with pytest.raises(ClientError, match=expected) as err:
                SGLangClient(servers[mode].url, timeout_s=2).generate([1, 300, 301], 1)
            assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    finally:
        for server in servers.values():
            server.stop()


def test_a_port_taken_before_the_server_binds_it_is_chosen_again(tmp_path, monkeypatch):
    import socket

    from sagecheck.engines.sglang import server as server_module

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    first = iter([taken])  # the port chosen first is taken by another process before the server binds it
    real = server_module.free_port
    monkeypatch.setattr(server_module, "free_port", lambda host="127.0.0.1", **kw: next(first, None) or real(host, **kw))
    try:
        with Server(spec("fa3"), tmp_path, 120) as server:
            assert server.spec.port != taken and server.url.endswith(f":{server.spec.port}")
            assert SGLangClient(server.url).server_info()["attention_backend"] == "fa3"
        assert "already in use" in (tmp_path / f"sglang-fa3-{taken}.log").read_text()
    finally:
        blocker.close()

"""`make gpu-check`: real SGLang servers, triton against sagecheck's sage_attn, on the built-in model (GPU only).

Six servers start side by side (``params/sglang-builtin-gpu.yaml``'s flags, a memory fraction each that fits them
all): ``triton`` and ``triton_nograph`` (the control: what CUDA graphs alone change in the baseline);
``sage`` (sage_attn, CUDA graphs on: SGLang's default); ``sage_nograph`` (the same with ``--disable-cuda-graph``);
``sage_kernel_decode`` (``SAGE_ATTN_DECODE=sage``, graphs off, chunked prefill of 512 tokens); and
``sage_kernel_decode_graphs``, which must refuse to start. Each test prints one JSON line of figures (``-s``),
the note quotes them. Skipped where there is no GPU, no real SGLang or no sageattention.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sagecheck import models
from sagecheck.data import corpus, prompts
from sagecheck.engines.sglang import launch_spec
from sagecheck.engines.sglang.client import SGLangClient
from sagecheck.engines.sglang.server import Server, ServerError
from sagecheck.sources import load as load_params
from sagecheck.backend_stats import read
from tests.conftest import ROOT

pytestmark = pytest.mark.gpu
PRESET = ROOT / "params" / "sglang-builtin-gpu.yaml"
SERVERS = {  # name: (--attention-backend, plugin environment, more flags)
    "triton": ("triton", {}, []),
    "triton_nograph": ("triton", {}, ["--disable-cuda-graph"]),
    "sage": ("sage_attn", {}, []),
    "sage_nograph": ("sage_attn", {}, ["--disable-cuda-graph"]),
    "sage_kernel_decode": ("sage_attn", {"SAGE_ATTN_DECODE": "sage"}, ["--disable-cuda-graph", "--chunked-prefill-size", "512"]),
    "sage_kernel_decode_graphs": ("sage_attn", {"SAGE_ATTN_DECODE": "sage"}, []),  # must refuse to start
}
MEM_FRACTION = 0.6  # of the whole card, others included: six small servers (a few GB each) fit side by side


def real_sglang() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("sageattention") is None:
        return False
    spec = importlib.util.find_spec("sglang")
    return spec is not None and "standin" not in str(spec.origin)


def report(name: str, **figures) -> None:
    print(json.dumps({"check": name, **figures}, default=float))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not real_sglang():
        pytest.skip("needs a CUDA GPU, SGLang and sageattention")
    params = load_params(PRESET)
    log_dir = Path(os.environ.get("SAGECHECK_GPU_LOGS") or tmp_path_factory.mktemp("sglang-gpu"))
    out, launched = {}, []
    for name, (backend, env, extra) in SERVERS.items():  # all start now, from this thread (it outlives them)
        spec = launch_spec(params, backend, log_dir, mem_fraction_static=MEM_FRACTION)
        spec.extra_args = [*spec.extra_args, *extra]
        stats_dir = log_dir / f"stats-{name}"
        server = Server(spec, log_dir, params.sglang.startup_timeout_s, env={**env, "SAGE_ATTN_STATS_DIR": str(stats_dir)}, name=name)
        launched.append((name, server.launch(), stats_dir))
        time.sleep(2.0)  # start-up order in the logs
    t0 = time.monotonic()
    for name, server, stats_dir in launched:
        try:
            server.wait_ready()
            out[name] = (SGLangClient(server.url, 600), stats_dir, server)
            report("server started", server=name, seconds_since_all_launched=round(time.monotonic() - t0, 1))
        except ServerError as e:
            server.stop()
            out[name] = e
            report("server failed", server=name, cause=e.cause)
    yield out
    for got in out.values():
        if not isinstance(got, Exception):
            got[2].stop()


def client(servers, name):
    got = servers[name]
    if isinstance(got, Exception):
        pytest.fail(f"the {name} server did not start: {got}")
    return got[0]


def stats(servers, name):
    time.sleep(1.0)  # the plugin writes its counters twice a second
    return read(servers[name][1])


@pytest.fixture(scope="module")
def texts():
    tok = models.load_tokenizer(models.resolve("builtin"))
    ids = prompts.encode(tok, corpus.load_text("builtin").text)
    bos = prompts.bos_ids(tok)
    return tok, [p for n in (100, 300, 1000, 3000) for p in prompts.cut_prompts(ids, 1, n, bos)]


def mean_abs(a, b):
    return float(np.mean(np.abs(np.concatenate(a) - np.concatenate(b))))


def test_gpu_teacher_forced_logprobs_sage_close_to_triton_and_cuda_graphs_change_nothing(servers, texts):
    _, batch = texts
    lp = {name: client(servers, name).input_logprobs(batch) for name in ("triton", "sage", "sage_nograph")}
    sage_vs_triton = mean_abs(lp["sage"], lp["triton"])
    graphs = mean_abs(lp["sage"], lp["sage_nograph"])
    worst = float(max(np.max(np.abs(a - b)) for a, b in zip(lp["sage"], lp["triton"])))
    counts = stats(servers, "sage")["counts"]
    report("teacher-forced logprobs", positions=sum(len(x) for x in lp["sage"]), sage_vs_triton_mean_abs=sage_vs_triton,
           sage_vs_triton_max_abs=worst, graphs_on_vs_off_mean_abs=graphs, sage_counts=counts)
    assert 0 < sage_vs_triton < 0.05  # 8-bit Q·K: close to the baseline, never identical
    assert graphs <= 0.1 * sage_vs_triton  # CUDA graphs on or off: the same prefill
    assert counts.get("extend_batches_kernel", 0) >= 1 and not any(k.startswith("fallback:") for k in counts)


def test_gpu_a_cached_prefix_and_chunked_prefill_give_the_same_logprobs(servers, texts):
    _, batch = texts
    full = batch[3][:1500]
    head = full[:900]
    sage = client(servers, "sage")

    def tail_logprobs(c, warm):
        c.flush_cache()
        if warm:  # the radix cache now holds the first 900 tokens
            c.generate(head, max_new_tokens=1)
        out = c.generate(full, max_new_tokens=1, return_logprob=True, logprob_start_len=len(head))
        return np.array([e[0] for e in out["meta_info"]["input_token_logprobs"]][1:], dtype=np.float64)

    before = stats(servers, "sage")["counts"].get("extend_batches_with_prefix", 0)
    cold, warm = tail_logprobs(sage, False), tail_logprobs(sage, True)
    after = stats(servers, "sage")["counts"].get("extend_batches_with_prefix", 0)
    triton = tail_logprobs(client(servers, "triton"), False)
    chunked = tail_logprobs(client(servers, "sage_kernel_decode"), False)  # --chunked-prefill-size 512: 3 chunks
    chunk_counts = stats(servers, "sage_kernel_decode")["counts"]
    report("cached prefix and chunked prefill", tokens=len(cold), prefix_batches=after - before,
           prefix_vs_cold_mean_abs=float(np.mean(np.abs(warm - cold))), chunked_vs_cold_mean_abs=float(np.mean(np.abs(chunked - cold))),
           cold_vs_triton_mean_abs=float(np.mean(np.abs(cold - triton))), chunked_server_counts=chunk_counts)
    assert after - before >= 1, "the warm request must have run with a cached prefix"
    scale = float(np.mean(np.abs(cold - triton)))
    assert np.mean(np.abs(warm - cold)) <= scale and np.mean(np.abs(chunked - cold)) <= scale
    assert np.mean(np.abs(warm - triton)) < 0.05 and chunk_counts.get("extend_batches_with_prefix", 0) >= 2


def greedy_with_logprobs(c, batch, n):
    out = c.generate(batch, max_new_tokens=n, return_logprob=True, logprob_start_len=-1)
    return [([e[1] for e in o["meta_info"]["output_token_logprobs"]], np.array([e[0] for e in o["meta_info"]["output_token_logprobs"]]))
            for o in out]


def agreed(a, b):
    """Per sequence, the logprob differences of the generated tokens up to the first token where the two differ."""
    diffs, firsts = [], []
    for (ta, la), (tb, lb) in zip(a, b):
        k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        firsts.append(k)
        diffs.append(np.abs(la[:k] - lb[:k]))
    return float(np.mean(np.concatenate(diffs))) if any(len(d) for d in diffs) else float("nan"), firsts


def test_gpu_decode_in_cuda_graphs_changes_sage_attn_no_more_than_the_baseline_and_kernel_decode_stays_close(servers, texts):
    _, batch = texts
    short = [batch[3][i * 600:i * 600 + 200] for i in range(4)]  # four different passages of 200 tokens
    names = ("triton", "triton_nograph", "sage", "sage_nograph", "sage_kernel_decode")
    runs = {name: greedy_with_logprobs(client(servers, name), short, 32) for name in names}
    graph_diff, graph_first = agreed(runs["sage"], runs["sage_nograph"])
    control_diff, control_first = agreed(runs["triton"], runs["triton_nograph"])
    kernel_diff, kernel_first = agreed(runs["sage_kernel_decode"], runs["sage_nograph"])
    base_diff, base_first = agreed(runs["sage_nograph"], runs["triton_nograph"])
    counts = stats(servers, "sage_kernel_decode")["counts"]
    replays = stats(servers, "sage")["counts"].get("decode_graph_replays", 0)
    report("decode", sage_graphs_vs_eager_mean_abs=graph_diff, sage_graphs_vs_eager_first_divergence=graph_first,
           triton_graphs_vs_eager_mean_abs=control_diff, triton_graphs_vs_eager_first_divergence=control_first,
           kernel_decode_vs_triton_decode_mean_abs=kernel_diff, kernel_decode_first_divergence=kernel_first,
           sage_vs_triton_mean_abs=base_diff, sage_vs_triton_first_divergence=base_first,
           kernel_decode_counts=counts, sage_decode_graph_replays=replays)
    # stale metadata in a replayed graph would read other requests' keys: far beyond what graphs change in the baseline
    assert graph_diff <= 2 * control_diff + 1e-3 and replays >= 31
    assert counts.get("decode_batches_kernel", 0) >= 31 and kernel_diff < 0.05


def test_gpu_kernel_decode_with_cuda_graphs_is_refused_at_start(servers):
    got = servers["sage_kernel_decode_graphs"]
    assert isinstance(got, ServerError), "SAGE_ATTN_DECODE=sage with CUDA graphs must not start"
    report("kernel decode with CUDA graphs", cause=got.cause)
    assert "SAGE_ATTN_DECODE=sage" in got.cause and "--disable-cuda-graph" in got.cause

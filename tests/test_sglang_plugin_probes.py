"""The measurement-only variants of the plugin (``benchmarks/probes``), which ``benchmarks/ttft_gap.py`` starts: each
changes one thing of ``sage_attn`` and nothing else. Their classes are tested on stubs of the SGLang modules the
plugin imports (no SGLang here), their registration on the stand-in's."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from tests.test_benchmarks import load

PROBES = ROOT / "benchmarks" / "probes"


@pytest.fixture
def probes(monkeypatch):
    """``sagecheck_probes.backends`` imported on stubs of SGLang's modules (gone again after the test), with the calls
    the stubs and sage_attn's own extend (replaced by a recorder) receive."""
    calls = []

    class TritonAttnBackend:  # the parts of SGLang's Triton backend the probes reach
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
            calls.append(("triton", save_kv_cache))
            return "triton output"

        def init_forward_metadata(self, forward_batch):
            calls.append(("triton metadata", forward_batch.forward_mode))

        def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
            calls.append(("graph metadata", in_capture))

    class ForwardMode:
        EXTEND = "extend"

    stubs = {"sglang.srt.layers.attention.triton_backend": {"TritonAttnBackend": TritonAttnBackend},
             "sglang.srt.mem_cache.memory_pool": {"KVWriteLoc": object},
             "sglang.srt.model_executor.forward_batch_info": {"ForwardMode": ForwardMode}}
    for name in ("sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.attention", "sglang.srt.mem_cache",
                 "sglang.srt.model_executor", *stubs):
        module = types.ModuleType(name)
        for attr, value in stubs.get(name, {}).items():
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("sagecheck.sglang_plugin.backend", "sagecheck_probes", "sagecheck_probes.backends"):
        monkeypatch.setitem(sys.modules, name, None)  # imported on the stubs: gone again after the test
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(PROBES))
    from sagecheck.sglang_plugin.backend import SageAttnBackend
    import sagecheck_probes.backends as backends

    def extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        calls.append(("kernel path" if self._batch_route == "kernel" else "triton route", save_kv_cache))
        return "kernel output" if self._batch_route == "kernel" else TritonAttnBackend.forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)

    monkeypatch.setattr(SageAttnBackend, "forward_extend", extend)
    return SimpleNamespace(backends=backends, sage=SageAttnBackend, calls=calls)


def bare(cls):
    """An instance with no model runner: its route and statistics set as ``init_forward_metadata`` would."""
    from sagecheck.sglang_plugin.stats import Stats

    backend = cls.__new__(cls)
    backend.stats = Stats(None, {})
    return backend


def test_the_shadow_probe_returns_tritons_output_after_the_kernel_path(probes):
    """A batch routed to the kernel runs sage_attn's kernel path (which writes the cache) and then Triton's extend
    kernel without writing it again, and returns Triton's output; a batch routed to Triton runs Triton's alone."""
    probe = bare(probes.backends.ShadowKernelBackend)
    probe._batch_route = "kernel"
    assert probe.forward_extend("q", "k", "v", "layer", "batch") == "triton output"
    assert probes.calls == [("kernel path", True), ("triton", False)] and probe.stats.counts["shadow_extend_layers"] == 1
    probes.calls.clear()
    probe._batch_route = "triton"
    assert probe.forward_extend("q", "k", "v", "layer", "batch") == "triton output"
    assert probes.calls == [("triton route", True), ("triton", True)] and probe.stats.counts["shadow_extend_layers"] == 1


def test_the_release_probe_hands_memory_back_once_after_a_kernel_batch(probes, monkeypatch):
    """After a batch on the kernel, the next batch's set-up (eager metadata, or a decode graph's replay) first waits
    for the device and empties the allocator's cache, once; not after a batch on Triton, not during a graph capture."""
    import torch

    released = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: released.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append("empty_cache"))
    probe = bare(probes.backends.ReleaseAfterKernelBackend)
    routes = iter(["triton", "kernel"])

    def route(self, forward_batch):  # sage_attn's metadata: the rule's route for the batch
        self._batch_route = next(routes)

    monkeypatch.setattr(probes.sage, "init_forward_metadata", route)
    monkeypatch.setattr(probes.sage, "init_forward_metadata_out_graph", lambda self, fb, in_capture=False: None)
    probe.init_forward_metadata("first prefill")  # on Triton: nothing to hand back after it
    probe.init_forward_metadata_out_graph("decode", in_capture=False)
    assert released == [] and not probe.stats.counts
    probe.init_forward_metadata("second prefill")  # on the kernel
    probe.init_forward_metadata_out_graph("capture", in_capture=True)  # a capture allocates from its own pool: not here
    assert released == []
    probe.init_forward_metadata_out_graph("decode", in_capture=False)
    probe.init_forward_metadata_out_graph("decode", in_capture=False)
    assert released == ["synchronize", "empty_cache"] and probe.stats.counts["probe_cache_releases"] == 1


def test_ttft_gap_starts_the_probes_with_their_plugin_on_the_path(tmp_path):
    gap = load("ttft_gap")
    from sagecheck.sources import load as load_params

    params = load_params(str(ROOT / "tests" / "params_sglang.yaml"), [])
    for name in ("sage_attn_shadow", "sage_attn_release"):
        env = gap.variant_env(params, name, tmp_path)
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROBES)
        assert env["SAGE_ATTN_DISPATCH"] == "measured" and "SAGE_ATTN_STATS_DIR" in env
    assert all("PYTHONPATH" not in gap.variant_env(params, n, tmp_path)
               for n in set(gap.VARIANTS) - {"sage_attn_shadow", "sage_attn_release"})


def test_the_probes_plugin_is_found_by_its_entry_point_and_registers_its_backends():
    """With ``benchmarks/probes`` on the path (as ttft_gap puts it), SGLang's plugin loader finds ``sagecheck_probes``
    by its entry point, and its ``register`` makes each probe a backend choice with a factory (here on the stand-in's
    SGLang modules, in a process of its own)."""
    import subprocess

    code = ("from importlib.metadata import entry_points\n"
            "eps = {e.name: e.value for e in entry_points(group='sglang.srt.plugins')}\n"
            "import sagecheck_probes\n"
            "sagecheck_probes.register()\n"
            "sagecheck_probes.register()\n"  # idempotent, as SGLang may load plugins in several processes
            "from sglang.srt import server_args\n"
            "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
            "print(eps.get('sagecheck_probes'), *(f'{n}:{server_args.ATTENTION_BACKEND_CHOICES.count(n)}:'\n"
            "      f'{callable(ATTENTION_BACKENDS.get(n))}' for n in ('sage_attn_shadow', 'sage_attn_release')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBES), str(ROOT / "tests" / "standin"), str(ROOT / "lib")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["sagecheck_probes:register", "sage_attn_shadow:1:True", "sage_attn_release:1:True"]


def test_ttft_gap_varlen_variant_runs_every_extend_on_sageattn_varlen(tmp_path):
    """``sage_attn_varlen`` is the served backend with two settings changed, which the plugin reads back as such: the
    packed ``sageattn_varlen`` path for prefill, and every extend batch on it (so an 8192-token prefill is on the
    kernel whatever the start-up measurement would say)."""
    gap = load("ttft_gap")
    from sagecheck.sglang_plugin.settings import Settings
    from sagecheck.sources import load as load_params

    params = load_params(str(ROOT / "tests" / "params_sglang.yaml"), [])
    env = gap.variant_env(params, "sage_attn_varlen", tmp_path)
    settings = Settings.from_env(env)
    assert (settings.prefill, settings.dispatch) == ("varlen", "kernel") and settings.stats_dir is not None
    assert gap.VARIANTS["sage_attn_varlen"][0] == "sage_attn" and "PYTHONPATH" not in env
    assert gap.variant_env(params, "sage_attn", tmp_path)["SAGE_ATTN_PREFILL"] == "auto"

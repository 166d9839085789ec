"""The measurement-only variants of the plugin (``benchmarks/probes``), which ``benchmarks/ttft_gap.py`` starts: each
changes one thing of ``sage_attn`` and nothing else."""

from __future__ import annotations

import os

from tests.conftest import ROOT
from tests.test_benchmarks import load


def test_the_shadow_probe_returns_tritons_output_after_the_kernel_path(monkeypatch, tmp_path):
    """benchmarks/probes' ``sage_attn_shadow`` (ttft_gap's variant), its class on stubs of the SGLang modules it
    imports: a batch routed to the kernel runs sage_attn's kernel path (which writes the cache) and then Triton's
    extend kernel without writing it again, and returns Triton's output; a batch routed to Triton runs Triton's alone.
    ttft_gap starts it with the probes' plugin on the server's path, and no other variant."""
    import sys
    import types

    calls = []

    class TritonAttnBackend:  # the parts of SGLang's Triton backend the probe reaches
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
            calls.append(("triton", save_kv_cache))
            return "triton output"

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
    imported_here = ("sagecheck.sglang_plugin.backend", "sagecheck_probes", "sagecheck_probes.backends")
    for name in imported_here:  # imported on the stubs: gone again after the test, whatever was there before
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "probes"))
    from sagecheck.sglang_plugin.backend import SageAttnBackend
    from sagecheck_probes.backends import ShadowKernelBackend

    def kernel_path(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        calls.append(("kernel path" if self._batch_route == "kernel" else "triton route", save_kv_cache))
        return "kernel output" if self._batch_route == "kernel" else TritonAttnBackend.forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)

    monkeypatch.setattr(SageAttnBackend, "forward_extend", kernel_path)
    from sagecheck.sglang_plugin.stats import Stats

    probe = ShadowKernelBackend.__new__(ShadowKernelBackend)  # no model runner: the route is set as init_forward_metadata sets it
    probe.stats = Stats(None, {})
    probe._batch_route = "kernel"
    assert probe.forward_extend("q", "k", "v", "layer", "batch") == "triton output"
    assert calls == [("kernel path", True), ("triton", False)] and probe.stats.counts["shadow_extend_layers"] == 1
    calls.clear()
    probe._batch_route = "triton"
    assert probe.forward_extend("q", "k", "v", "layer", "batch") == "triton output"
    assert calls == [("triton route", True), ("triton", True)] and probe.stats.counts["shadow_extend_layers"] == 1

    gap = load("ttft_gap")
    from sagecheck.sources import load as load_params

    params = load_params(str(ROOT / "tests" / "params_sglang.yaml"), [])
    shadow = gap.variant_env(params, "sage_attn_shadow", tmp_path)
    assert shadow["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "benchmarks" / "probes")
    assert shadow["SAGE_ATTN_DISPATCH"] == "measured" and "SAGE_ATTN_STATS_DIR" in shadow
    assert all("PYTHONPATH" not in gap.variant_env(params, n, tmp_path) for n in gap.VARIANTS if n != "sage_attn_shadow")
    entry = (ROOT / "benchmarks" / "probes" / "sagecheck_probes-0.1.dist-info" / "entry_points.txt").read_text()
    assert "sagecheck_probes = sagecheck_probes:register" in entry


def test_the_probes_plugin_is_found_by_its_entry_point_and_registers_its_backend():
    """With ``benchmarks/probes`` on the path (as ttft_gap puts it), SGLang's plugin loader finds ``sagecheck_probes``
    by its entry point, and its ``register`` makes ``sage_attn_shadow`` a backend choice with a factory (here on the
    stand-in's SGLang modules, in a process of its own)."""
    import subprocess
    import sys

    code = ("from importlib.metadata import entry_points\n"
            "eps = {e.name: e.value for e in entry_points(group='sglang.srt.plugins')}\n"
            "import sagecheck_probes\n"
            "sagecheck_probes.register()\n"
            "sagecheck_probes.register()\n"  # idempotent, as SGLang may load plugins in several processes
            "from sglang.srt import server_args\n"
            "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS\n"
            "print(eps.get('sagecheck_probes'), server_args.ATTENTION_BACKEND_CHOICES.count('sage_attn_shadow'),"
            " callable(ATTENTION_BACKENDS.get('sage_attn_shadow')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "probes"), str(ROOT / "tests" / "standin"),
                                                        str(ROOT / "lib")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["sagecheck_probes:register", "1", "True"]

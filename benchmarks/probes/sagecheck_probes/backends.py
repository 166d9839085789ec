"""MEASUREMENT ONLY: the probe variants of ``SageAttnBackend`` (see the package docstring)."""

from __future__ import annotations

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from sagecheck.sglang_plugin.backend import SageAttnBackend


class ShadowKernelBackend(SageAttnBackend):
    """Where the rule sends a batch to the kernel: the kernel path runs (its output dropped), then Triton's extend
    kernel on the same batch, whose output is returned; the new keys and values are written to the cache once, by
    the kernel path, as ``sage_attn`` writes them."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        if self._batch_route != "kernel":
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)
        super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)
        self.stats.count("shadow_extend_layers")
        return TritonAttnBackend.forward_extend(self, q, k, v, layer, forward_batch, False, sinks=sinks, **kwargs)

"""MEASUREMENT ONLY: the probe variants of ``SageAttnBackend`` (see the package docstring)."""

from __future__ import annotations

import torch
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


class ReleaseAfterKernelBackend(SageAttnBackend):
    """``sage_attn``, but after a batch on the kernel the caching allocator's unused memory is handed back once, before
    the next batch is set up (its eager metadata or a decode graph's replay): SageAttention 2's temporaries and outputs
    come from the default stream's pool (``batched.on_default_stream``) and are otherwise held until SGLang flushes
    its cache after the request. Counted as ``probe_cache_releases``."""

    _release_pending = False

    def _release_if_pending(self) -> None:
        if self._release_pending:
            self._release_pending = False
            torch.cuda.synchronize()  # the default stream's last uses must be over for its blocks to be free
            torch.cuda.empty_cache()
            self.stats.count("probe_cache_releases")

    def init_forward_metadata(self, forward_batch):
        self._release_if_pending()
        super().init_forward_metadata(forward_batch)
        if self._batch_route == "kernel":
            self._release_pending = True

    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        if not in_capture:
            self._release_if_pending()
        super().init_forward_metadata_out_graph(forward_batch, in_capture)

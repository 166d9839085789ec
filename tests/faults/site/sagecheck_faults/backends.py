"""TEST ONLY: the wrong variants of ``SageAttnBackend`` in a real SGLang server (see the package docstring)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from sagecheck.sglang_plugin.backend import SageAttnBackend
from sagecheck.sglang_plugin.varlen import smooth_keys

BLOCK = 64


class PrefixFault(SageAttnBackend):
    """The cached prefix gathered in whole 64-token blocks: a partial last block's keys read as the block's first."""

    def _prefix_indices(self, layout: Any) -> torch.Tensor:
        idx = super()._prefix_indices(layout).clone()
        offset = 0
        for n in layout.prefix_lens:
            lost = n % BLOCK
            if lost:
                start = n - lost
                idx[offset + start: offset + n] = idx[offset + start]
            offset += n
        return idx


class PaddedDecodeFault(SageAttnBackend):
    """Decode on the kernel without dividing out the zero-padded keys the non-causal kernel counts."""

    def _decode_attention(self, q, keys, values, cu_k, seq_lens, scale):
        cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        q16, k16, v16 = q.to(torch.float16), keys.to(torch.float16), values.to(torch.float16)
        out = self.kernel(q16, smooth_keys(k16, seq_lens), v16, cu_q, cu_k, 1, max(int(n) for n in seq_lens),
                          is_causal=False, sm_scale=scale, smooth_k=False)
        return out.to(q.dtype)


class StaleGraphFault(SageAttnBackend):
    """A replayed decode graph keeps each request's length of its first replay: the keys generated since are left out."""

    _first: dict[int, int]

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        if in_capture or not forward_batch.forward_mode.is_decode():
            return super().init_forward_metadata_out_graph(forward_batch, in_capture)
        first = self.__dict__.setdefault("_first", {})
        n = len(forward_batch.req_pool_indices)
        lens = forward_batch.seq_lens[:n].tolist()
        stale = []
        for req, length in zip(forward_batch.req_pool_indices.tolist(), lens):
            if req not in first or first[req] > length:  # a new request in this slot
                first[req] = length
            stale.append(first[req])
        fb = copy.copy(forward_batch)
        fb.seq_lens = forward_batch.seq_lens.clone()
        fb.seq_lens[:n] = torch.tensor(stale, dtype=fb.seq_lens.dtype, device=fb.seq_lens.device)
        if getattr(forward_batch, "seq_lens_cpu", None) is not None:
            fb.seq_lens_cpu = fb.seq_lens.cpu()
        if getattr(forward_batch, "seq_lens_sum", None) is not None:
            fb.seq_lens_sum = int(fb.seq_lens[:n].sum())
        return super().init_forward_metadata_out_graph(fb, in_capture)


class HeadSplitFault(SageAttnBackend):
    """Ranks after the first put their query heads' outputs in the wrong places (rotated by one): no effect on one rank."""

    def _wrong(self, out: torch.Tensor, layer: Any) -> torch.Tensor:
        if self.stats.config.get("tp_rank", 0) == 0:
            return out
        return out.view(-1, layer.tp_q_head_num, layer.v_head_dim).roll(1, dims=1).reshape(out.shape)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        return self._wrong(super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs), layer)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        return self._wrong(super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs), layer)


def faulty_backend(fault: str) -> type:
    # on a GPU, 1.0.6's non-causal kernel counts a partial block's masked-out slots itself: padded_kernel is the
    # uncorrected decode (the stand-in emulates that kernel)
    return {"prefix": PrefixFault, "padded_decode": PaddedDecodeFault, "stale_graph": StaleGraphFault,
            "head_split": HeadSplitFault, "causal_prefix": CausalPrefixFault, "prefix_fallback": PrefixFallbackFault,
            "wrong_scale": WrongScaleFault, "padded_kernel": PaddedDecodeFault, "split_own_means": SplitOwnMeansFault,
            "route_miscount": RouteMiscountFault}[fault]


class CausalPrefixFault(SageAttnBackend):
    """An extend over a cached prefix calls the kernel causal with the new tokens only: fewer queries than keys."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        layout = self._layout
        if layout is None or not layout.has_prefix or self.prefill != "varlen" or self._batch_fallback:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        heads, kv_heads, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        idx = self._prefix_indices(layout)
        k_all = torch.empty((layout.total, kv_heads, d), dtype=k.dtype, device=k.device)
        v_all = torch.empty_like(k_all)
        k_all[layout.new_pos], k_all[layout.prefix_pos] = k.view(-1, kv_heads, d), self.token_to_kv_pool.get_key_buffer(layer.layer_id)[idx]
        v_all[layout.new_pos], v_all[layout.prefix_pos] = v.view(-1, kv_heads, d), self.token_to_kv_pool.get_value_buffer(layer.layer_id)[idx]
        cu_q = torch.tensor([0] + list(torch.tensor(layout.extend_lens).cumsum(0).tolist()), dtype=torch.int32, device=q.device)
        k16, v16 = k_all.to(torch.float16), v_all.to(torch.float16)
        out = self.kernel(q.view(-1, heads, d).to(torch.float16), smooth_keys(k16, layout.seq_lens), v16, cu_q,
                          layout.cu_seqlens, max(layout.extend_lens), layout.max_seqlen, is_causal=True,
                          sm_scale=layer.scaling, smooth_k=False)
        return out.to(q.dtype).reshape(-1, heads * layer.v_head_dim)


class PrefixFallbackFault(SageAttnBackend):
    """Every batch with a cached prefix silently runs on Triton: no kernel call, nothing counted."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        if self._layout is not None and self._layout.has_prefix:
            return super(SageAttnBackend, self).forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)


class WrongScaleFault(SageAttnBackend):
    """Every kernel call gets 1.25 times the layer's softmax scale."""

    def __init__(self, model_runner: Any) -> None:
        super().__init__(model_runner)
        for name in ("kernel", "batched_kernel"):
            kernel = getattr(self, name, None)
            if kernel is not None:
                setattr(self, name, self._scaled(kernel))

    @staticmethod
    def _scaled(kernel: Any) -> Any:
        def call(*args: Any, sm_scale: float | None = None, **kwargs: Any) -> Any:
            return kernel(*args, sm_scale=None if sm_scale is None else 1.25 * sm_scale, **kwargs)
        return call


class SplitOwnMeansFault(SageAttnBackend):
    """The split of a prefix extend with each part smoothed by its own mean (:mod:`sagecheck_faults.split`)."""

    def _kernel_extend(self, q3, k3, v3, k_prefix, v_prefix, layout, groups, plan, scale):
        if plan is None:
            return super()._kernel_extend(q3, k3, v3, k_prefix, v_prefix, layout, groups, plan, scale)
        from sagecheck_faults.split import extend_split_own_means

        return extend_split_own_means(self.batched_kernel, q3, k3, v3, k_prefix, v_prefix, layout, plan, scale,
                                      self.kernel_smooths)


class RouteMiscountFault(SageAttnBackend):
    """A batch the dispatch rule sends to Triton runs on the kernel, still counted as Triton's."""

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        if self._batch_route == "triton":
            from sagecheck.sglang_plugin.varlen import ExtendLayout, extend_lengths

            prefix, extend = extend_lengths(forward_batch)
            self._batch_route = "kernel"
            self._layout = ExtendLayout.build(prefix, extend, self.device)
            self._groups, self._split = self._plans(self._layout)

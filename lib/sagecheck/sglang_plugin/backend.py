"""``SageAttnBackend``: SGLang's Triton attention backend with prefill (and optionally decode) on SageAttention.

What runs where:

* **Prefill / extend** (``ForwardMode.EXTEND``): each batch goes to sageattention or to the Triton backend's
  extend kernel by the dispatch rule (:mod:`.dispatch`, ``SAGE_ATTN_DISPATCH``): the kernel only where it beat
  Triton in a measurement at start on this GPU and model shape (or always, with ``kernel``). On the kernel, causal,
  for every request of the batch, with or without a cached prefix (radix cache hit, chunked prefill). Which function
  (``SAGE_ATTN_PREFILL``, :mod:`.settings`): ``sageattn_varlen`` on the packed batch (:mod:`.varlen`; 1.0.6's
  default), or ``sageattn`` on the batch padded per group of similar lengths (:mod:`.batched`; SageAttention 2's
  default, which reaches its Hopper FP8 kernel). A request with a cached prefix: where the kernel returns the
  log-sum-exp (SageAttention 2), its new tokens against the prefix and against themselves in two calls merged
  exactly (:mod:`.split`); else packed as its whole sequence, the prefix's rows computed too
  (:func:`sagecheck.sglang_plugin.varlen.extend_with`). The new K/V are written to SGLang's cache first, exactly as
  the Triton backend writes them; the cache is then only read (prefix keys are gathered into a new tensor,
  smoothing is out of place). What a batch needs in every layer (layouts, padded-call plans, smoothing indices) is
  built once per batch, so a layer copies nothing from the host.
* **Decode**: ``SAGE_ATTN_DECODE=triton`` (default) runs the Triton backend's decode, CUDA
  graphs included: nothing of this class runs inside a captured graph, so a replay cannot
  read stale metadata of ours. ``SAGE_ATTN_DECODE=sage`` runs
  :func:`~sagecheck.sglang_plugin.varlen.decode_attention` eagerly (needs ``--disable-cuda-graph``).
* **Everything else falls back to the Triton backend and is counted** (``fallback:<reason>``
  in the statistics): mixed, speculative and other forward modes; layers with a sliding
  window, a logit cap, attention sinks, cross/encoder attention, KV scales or shared KV.
* Metadata (Triton's ``kv_indptr``/``kv_indices``, the batch's route and our packing layout) is rebuilt in every
  :meth:`init_forward_metadata`, the eager entry SGLang calls before each eager batch and each
  prefill-graph replay (whose attention runs eagerly between graph segments).

Tensor parallelism: each rank sees its own heads (``layer.tp_q_head_num`` query and
``layer.tp_k_head_num`` KV heads), recorded in the statistics per rank.

What the kernel cannot serve fails at start (:class:`SageAttnUnavailable`, raised in the
scheduler, quoted in the server's log): no sageattention, a GPU below compute capability 8.0,
head dims other than 64 and 128, MLA, a KV cache in another dtype than the model (fp8),
``--page-size`` other than 1, decode on the kernel with CUDA graphs on.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sagecheck import census
from sagecheck.environment import (package_version, sageattention_label, sageattention_package,
                                   sageattention_smooths_out_of_place)
import sagecheck.sglang_plugin.batched as batched
import sagecheck.sglang_plugin.dispatch as dispatch
import sagecheck.sglang_plugin.split as split
from sagecheck.sglang_plugin.settings import NAME
from sagecheck.sglang_plugin.preflight import check_decode_mode, decode_graphs_enabled
from sagecheck.sglang_plugin.settings import INSTEAD, SageAttnUnavailable, Settings
from sagecheck.sglang_plugin.stats import Stats
from sagecheck.sglang_plugin.varlen import (ExtendLayout, decode_attention, extend_attention, extend_lengths, extend_with,
                                            load_kernel)

VARLEN_KERNEL = "sageattn_varlen: per-block INT8 Q·K, FP16 P·V (Triton)"
HEAD_DIMS = (64, 128)  # sageattn_varlen asserts these; sageattn pads others, which we do not serve


def batched_kernel_name(device: torch.device) -> str:
    """What ``sageattn`` runs on this GPU, measured once (sagecheck.attention.sage_kernel's probe: the functions of
    ``sageattention.core`` one small call went through)."""
    from sagecheck.attention import sage_kernel

    try:
        probe = sage_kernel.dispatch_probe(device)
    except Exception as e:  # noqa: BLE001 - a failed probe is reported, the kernel's own errors surface in serving
        return f"sageattn (probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    # the probe's own call is HND and not causal, unlike serving's; what else the kernel was told is worth naming
    return sage_kernel.dispatched_label(probe, leave_out=("tensor_layout", "is_causal", "return_lse")) + \
        ", padded per group of similar lengths"


def check_serveable(device: torch.device, head_dim: int, v_head_dim: int, use_mla: bool, model_dtype: torch.dtype,
                    kv_dtype: torch.dtype, page_size: int, decode: str, decode_graphs: bool) -> None:
    """Refuse, at start, what the kernel cannot serve: one message that says why and what to use instead."""
    if device.type != "cuda":
        raise SageAttnUnavailable(f"{NAME}: sageattention's kernel runs on NVIDIA GPUs only, this server runs on {device}; {INSTEAD}")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        raise SageAttnUnavailable(f"{NAME}: sageattention 1.0.6 needs compute capability 8.0 or newer (A100, RTX 30xx, "
                                  f"H100 ...); {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}; {INSTEAD}")
    if use_mla:
        raise SageAttnUnavailable(f"{NAME}: multi-head latent attention (DeepSeek-style MLA) is not supported; {INSTEAD} "
                                  f"or one of SGLang's MLA backends")
    if head_dim not in HEAD_DIMS or v_head_dim != head_dim:
        raise SageAttnUnavailable(f"{NAME}: sageattention's varlen kernel takes head dims {HEAD_DIMS} (equal for K and V); "
                                  f"this model has {head_dim} (V {v_head_dim}); {INSTEAD}")
    if kv_dtype != model_dtype:
        raise SageAttnUnavailable(f"{NAME}: the KV cache is {kv_dtype} and the model {model_dtype}; prefix keys are read from "
                                  f"the cache in the model's dtype, so drop --kv-cache-dtype, or {INSTEAD}")
    if page_size != 1:
        raise SageAttnUnavailable(f"{NAME}: --page-size {page_size}: prefix keys are gathered token by token; use page size 1 "
                                  f"(the default), or {INSTEAD}")
    check_decode_mode(Settings(decode=decode), decode_graphs)


class SageAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner: Any) -> None:
        self.settings = Settings.from_env()
        self.kernel = load_kernel()  # sageattn_varlen: varlen prefill and kernel decode
        self.prefill = self.settings.prefill_path(sageattention_package()["generation"])
        self.batched_kernel = batched.load_kernel() if self.prefill == "batched" else None
        super().__init__(model_runner)
        if getattr(self, "dcp_size", 1) > 1:
            raise SageAttnUnavailable(f"{NAME}: decode context parallelism (dcp size {self.dcp_size}) is not supported; {INSTEAD}")
        device = torch.device("cuda", model_runner.gpu_id) if model_runner.device == "cuda" else torch.device(model_runner.device)
        check_serveable(device,
                        model_runner.model_config.head_dim, self.v_head_dim, self.use_mla, model_runner.dtype,
                        model_runner.token_to_kv_pool.dtype, self.page_size, self.settings.decode,
                        decode_graphs_enabled(model_runner.server_args))
        tp_rank = getattr(model_runner, "tp_rank", 0)
        self.stats = Stats(self.settings.stats_dir, {
            "backend": NAME, "prefill": self.prefill,
            "kernel": VARLEN_KERNEL if self.prefill == "varlen" else batched_kernel_name(device),
            "sageattention_version": sageattention_label(),  # the importable one (a source build of 2 shadows 1.0.6)
            "sagecheck_version": package_version("sagecheck"), "decode": self.settings.decode,
            "decode_cuda_graphs": decode_graphs_enabled(model_runner.server_args),
            "tp_rank": tp_rank, "tp_size": getattr(model_runner, "tp_size", 1),
            "q_heads_per_rank": self.num_head, "kv_heads_per_rank": self.num_kv_head,
            "head_dim": model_runner.model_config.head_dim, "dtype": str(model_runner.dtype).replace("torch.", ""),
            "gpu": torch.cuda.get_device_name(), "sliding_window": model_runner.sliding_window_size,
        })
        # decode on the kernel reads each request's length on the host (the Triton backend opts out of that copy)
        self.needs_cpu_seq_lens = self.settings.decode == "sage"
        self.lse_split = self.prefill == "batched" and split.takes_lse(self.batched_kernel)
        # a kernel that smooths K without writing it (SageAttention 2) smooths a cold batch that pads nothing itself
        self.kernel_smooths = self.prefill == "batched" and sageattention_smooths_out_of_place()
        self.stats.config["prefix_extend"] = ("split: the new tokens against the prefix and against themselves, merged by "
                                              "log-sum-exp" if self.lse_split else
                                              "whole sequence: the prefix's rows computed too (the kernel returns no log-sum-exp)")
        self._layout: ExtendLayout | None = None
        self._groups: list[batched.PaddedGroup] = []
        self._split: split.SplitPlan | None = None
        self._batch_fallback: str | None = None
        self._batch_route: str | None = None
        self.crossover = self._crossover(model_runner, device)
        self.stats.config["dispatch"] = self.crossover.as_dict()
        self.stats.config["dispatch_rule"] = self.crossover.describe()
        self.stats.write()

    # ------------------------------------------------------------------ dispatch

    def _crossover(self, model_runner: Any, device: torch.device) -> dispatch.Crossover:
        """The rule of :mod:`.dispatch`: fixed by ``SAGE_ATTN_DISPATCH``, or measured here, on this GPU and model shape."""
        fixed = dispatch.from_setting(self.settings.dispatch)
        if fixed is not None:
            return fixed
        d, dtype = model_runner.model_config.head_dim, model_runner.dtype
        where = (f"{torch.cuda.get_device_name(device)}, {self.num_head} query / {self.num_kv_head} KV heads of {d}, "
                 f"{str(dtype).replace('torch.', '')}, one request of L tokens")
        try:
            with census.CENSUS.paused():  # the measurement's calls stand for no request's
                return dispatch.measure(self._timers(d, dtype), int(model_runner.model_config.context_len), where,
                                        device_time=dispatch.device_ms)
        except Exception as e:  # noqa: BLE001 - a failed measurement must not stop the server: said in the statistics
            return dispatch.Crossover("kernel", 0, "the measurement at start failed: every extend batch on the kernel",
                                      error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            torch.cuda.empty_cache()

    def _timers(self, d: int, dtype: torch.dtype) -> dispatch.Timers:
        """One layer's attention of one request of ``n`` tokens: this backend's kernel path, Triton's extend kernel (as
        the Triton backend calls it) and the bare kernel on K smoothed beforehand; and both paths again for a request
        of ``n`` keys whose first half is a cached prefix."""
        import inspect

        heads, kv_heads, dev, scale = self.num_head, self.num_kv_head, self.device, d ** -0.5

        def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return dispatch.request_inputs(n, heads, kv_heads, d, dtype, dev)

        def kernel_path(n: int):
            q, k, v = inputs(n)
            layout = ExtendLayout.build([0], [n], dev)
            groups, plan = self._plans(layout)
            return lambda: self._kernel_extend(q, k, v, None, None, layout, groups, plan, scale)

        def triton(n: int):
            q, k, v = inputs(n)
            o = torch.empty_like(q)
            qo = torch.tensor([0, n], dtype=torch.int32, device=dev)
            kv_indptr = torch.zeros(2, dtype=torch.int32, device=dev)
            kv_indices = torch.zeros(0, dtype=torch.int64, device=dev)
            return lambda: self.extend_attention_fwd(q, k, v, o, k, v, qo, kv_indptr, kv_indices, None, True, None, n, 1.0,
                                                     1.0, scale, logit_cap=0.0, sliding_window_size=-1, sinks=None,
                                                     window_kv_offsets=None, xai_temperature_len=-1, page_size=self.page_size)

        def prefix_inputs(n: int):
            """A request of ``n`` keys whose first ``n // 2`` are cached: the new tokens' Q, K, V, the cache and the
            prefix's slots in it (gathered in every layer, as :meth:`forward_extend` does)."""
            q, k, v = inputs(n)
            p = n // 2
            return q[p:], k[p:], v[p:], k[:p].contiguous(), v[:p].contiguous(), torch.arange(p, device=dev), p

        def kernel_path_prefix(n: int):
            q, k, v, k_cache, v_cache, slots, p = prefix_inputs(n)
            layout = ExtendLayout.build([p], [n - p], dev)
            groups, plan = self._plans(layout)
            return lambda: self._kernel_extend(q, k, v, k_cache[slots], v_cache[slots], layout, groups, plan, scale)

        def triton_prefix(n: int):
            q, k, v, k_cache, v_cache, slots, p = prefix_inputs(n)
            o = torch.empty_like(q)
            qo = torch.tensor([0, n - p], dtype=torch.int32, device=dev)
            kv_indptr = torch.tensor([0, p], dtype=torch.int32, device=dev)
            return lambda: self.extend_attention_fwd(q, k, v, o, k_cache, v_cache, qo, kv_indptr, slots, None, True, None,
                                                     n - p, 1.0, 1.0, scale, logit_cap=0.0, sliding_window_size=-1,
                                                     sinks=None, window_kv_offsets=None, xai_temperature_len=-1,
                                                     page_size=self.page_size)

        def alone(n: int):
            q, k, v = inputs(n)
            k = k - k.float().mean(0, keepdim=True).to(k.dtype)
            if self.prefill == "batched":
                bare = inspect.unwrap(self.batched_kernel)
                qn, kn, vn = q[None], k[None], v[None]
                return lambda: bare(qn, kn, vn, tensor_layout="NHD", is_causal=True, sm_scale=scale, smooth_k=False)
            bare, cu = inspect.unwrap(self.kernel), torch.tensor([0, n], dtype=torch.int32, device=dev)
            return lambda: bare(q, k, v, cu, cu, n, n, is_causal=True, sm_scale=scale, smooth_k=False)

        return dispatch.Timers(kernel_path, triton, alone, kernel_path_prefix=kernel_path_prefix, triton_prefix=triton_prefix)

    def _plans(self, layout: ExtendLayout) -> tuple[list[batched.PaddedGroup], split.SplitPlan | None]:
        """Per batch: the padded calls of a whole-sequence extend, or the split's plan (prefix extends merged by
        log-sum-exp; batches without a prefix run the same code, its causal part alone)."""
        if self.prefill != "batched":
            return [], None
        if self.lse_split or not layout.has_prefix:
            return [], split.plan_split(layout, self.device)
        return batched.plan(layout.seq_lens, self.device), None

    def _kernel_extend(self, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, k_prefix: torch.Tensor | None,
                       v_prefix: torch.Tensor | None, layout: ExtendLayout, groups: list[batched.PaddedGroup],
                       plan: split.SplitPlan | None, scale: float) -> torch.Tensor:
        """The extend on the kernel: ``[new tokens, heads, d_v]``."""
        if plan is not None:
            return split.extend_split(self.batched_kernel, q3, k3, v3, k_prefix, v_prefix, layout, plan, scale,
                                      kernel_smooths=self.kernel_smooths)
        if self.prefill == "batched":
            def attend(q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
                return batched.causal_attention(self.batched_kernel, q_all, k_all, v_all, layout.seq_lens, groups, scale,
                                                layout.seq_index)

            return extend_with(attend, q3, k3, v3, k_prefix, v_prefix, layout)
        return extend_attention(self.kernel, q3, k3, v3, k_prefix, v_prefix, layout, scale)

    # ------------------------------------------------------------------ metadata

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._layout, self._split, self._batch_fallback, self._batch_route = None, None, None, None
        mode = forward_batch.forward_mode
        if mode == ForwardMode.EXTEND:
            prefix, extend = extend_lengths(forward_batch)
            if not dispatch.to_kernel(prefix, extend, self.crossover):
                self._batch_route = "triton"
                self.stats.count("extend_batches_triton")
                self.stats.count("extend_tokens_triton", sum(extend))
                if any(prefix):
                    self.stats.count("extend_batches_with_prefix_triton")
                return
            self._batch_route = "kernel"
            self._layout = ExtendLayout.build(prefix, extend, self.device)
            self._groups, self._split = self._plans(self._layout)
            if self.prefill == "batched":
                new_groups = self._split.new_groups if self._split is not None else self._groups
                calls = self._split.calls if self._split is not None else len(self._groups)
                self.stats.count("extend_kernel_calls", calls)
                self.stats.count("extend_padded_tokens", batched.describe_plan(new_groups)["padded_tokens"])
            self.stats.count("extend_batches_kernel")
            self.stats.count("extend_tokens_kernel", sum(extend))
            self.stats.count("extend_kernel_pairs", split.pairs(prefix, extend, whole_sequence=self._split is None))
            if self._layout.has_prefix:
                self.stats.count("extend_batches_with_prefix")
                self.stats.count("extend_prefix_tokens", sum(prefix))
                if self._split is not None:
                    self.stats.count("extend_batches_split")
        elif mode.is_decode():
            self.stats.count("decode_batches_kernel" if self.settings.decode == "sage" else "decode_batches_triton")
        elif not mode.is_idle():
            self._batch_fallback = f"forward mode {mode.name.lower()}"
            self.stats.count(f"fallback:{self._batch_fallback}")

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not in_capture and forward_batch.forward_mode.is_decode():
            self.stats.count("decode_graph_replays")

    # ------------------------------------------------------------------ extend

    def _layer_fallback(self, layer: Any, k: Any, sinks: Any, kwargs: dict[str, Any]) -> str | None:
        if k is None:
            return "shared KV (no new keys)"
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            return "sliding-window layer"
        if layer.logit_cap and layer.logit_cap > 0:
            return "logit cap"
        if sinks is not None:
            return "attention sinks"
        if layer.is_cross_attention or getattr(layer.attn_type, "name", "DECODER") != "DECODER":
            return "cross or encoder attention"
        if layer.k_scale is not None or layer.v_scale is not None:
            return "KV scales"
        if kwargs:
            return f"arguments {sorted(kwargs)}"
        return None

    def _prefix_indices(self, layout: ExtendLayout) -> torch.Tensor:
        """The cache slots of every request's cached prefix, request after request (Triton's ``kv_indices``)."""
        return self.forward_metadata.kv_indices[: sum(layout.prefix_lens)]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        if self._batch_route == "triton":  # the dispatch rule's choice for the batch, counted once per batch
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)
        layout = self._layout
        reason = self._batch_fallback or ("no layout" if layout is None else self._layer_fallback(layer, k, sinks, kwargs))
        if reason is None and q.shape[0] != sum(layout.extend_lens):
            reason = "token count differs from the batch's"
        if reason is not None:
            if not self._batch_fallback:  # batch fallbacks are counted once, in init_forward_metadata
                self.stats.count(f"fallback:{reason}")
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)

        if save_kv_cache:
            loc = KVWriteLoc(forward_batch.out_cache_loc, self.forward_metadata.swa_out_cache_loc,
                             full_loc=self.forward_metadata.out_cache_loc_full_physical)
            self._set_kv_buffer(forward_batch, layer, loc, k, v)

        heads, kv_heads, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3 = q.view(-1, heads, d)
        k3, v3 = k.view(-1, kv_heads, d), v.view(-1, kv_heads, layer.v_head_dim)
        k_prefix = v_prefix = None
        if layout.has_prefix:
            idx = self._prefix_indices(layout)
            k_prefix = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[idx]
            v_prefix = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[idx]
        out = self._kernel_extend(q3, k3, v3, k_prefix, v_prefix, layout, self._groups, self._split, layer.scaling)
        return out.reshape(-1, heads * layer.v_head_dim)

    # ------------------------------------------------------------------ decode

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_k: torch.Tensor,
                          seq_lens: list[int], scale: float) -> torch.Tensor:
        return decode_attention(self.kernel, q, keys, values, cu_k, seq_lens, scale)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        reason = None if self.settings.decode == "sage" else "decode on triton"
        if reason is None:
            reason = self._layer_fallback(layer, k, sinks, kwargs)
            if reason is not None:
                self.stats.count(f"fallback:{reason}")
        if reason is not None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks, **kwargs)

        if save_kv_cache:
            loc = KVWriteLoc(forward_batch.out_cache_loc, self.forward_metadata.swa_out_cache_loc,
                             full_loc=self.forward_metadata.out_cache_loc_full_physical)
            self._set_kv_buffer(forward_batch, layer, loc, k, v)
        heads, d = layer.tp_q_head_num, layer.qk_head_dim
        bs = forward_batch.batch_size
        seq_lens = (forward_batch.seq_lens_cpu.tolist() if forward_batch.seq_lens_cpu is not None
                    else forward_batch.seq_lens.tolist())[:bs]
        kv_indptr = self.forward_metadata.kv_indptr[: bs + 1]
        idx = self.forward_metadata.kv_indices[: sum(seq_lens)]
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[idx]
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[idx]
        out = self._decode_attention(q.reshape(-1, heads, d)[:bs], keys, values, kv_indptr.to(torch.int32), seq_lens,
                                     layer.scaling)
        return out.reshape(-1, heads * layer.v_head_dim)

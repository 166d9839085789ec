"""The real SageAttention kernel (``sageattention.sageattn``), CUDA only.

Wrapped so that it keeps the registry's contract:

* the caller's tensors are never changed: ``sageattn`` 1.0.6 smooths K *in place*
  (``core.py``: ``k -= km``), which would corrupt a KV cache; we pass a copy of K;
* causal attention with a query shorter than the keys (chunked prefill) and boolean
  masks are not supported by the kernel: :class:`UnsupportedCall`, so that the caller
  can fall back to the baseline (and count it). A single query (decode) attends to
  every key, so it runs as non-causal;
* head dims other than 64, 96 and 128 are :class:`UnsupportedCall` too.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

from sagecheck.attention.contract import AttentionUnavailable, UnsupportedCall
from sagecheck.attention.baseline import check_shapes

SUPPORTED_HEAD_DIMS = (64, 96, 128)
CPU_ALTERNATIVE = "use 'sage-emulated' (the same arithmetic in plain torch) on a machine without CUDA"


def _version() -> str | None:
    try:
        return metadata.version("sageattention")
    except metadata.PackageNotFoundError:
        return None


def kernel_info() -> dict[str, Any]:
    version = _version()
    if version is None:
        return {"name": "sage", "variant": "not installed", "version": None}
    major = version.split(".")[0]
    variant = (
        "v1 Triton kernels (per-block INT8 QK^T, FP16 PV)"
        if major == "1"
        else f"v{major} (sageattn dispatches to the CUDA kernel for this GPU)"
    )
    return {"name": "sage", "package": "sageattention", "version": version, "variant": variant}


def load_kernel():
    """Import the kernel or raise :class:`AttentionUnavailable` saying why and what to use instead."""
    if not torch.cuda.is_available():
        raise AttentionUnavailable(
            f"attention 'sage' needs a CUDA GPU, and this machine has none (torch {torch.__version__}); {CPU_ALTERNATIVE}"
        )
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise AttentionUnavailable(
            f"attention 'sage' needs the sageattention package ({e}); install it with "
            f"`pip install sageattention==1.0.6`, or {CPU_ALTERNATIVE}"
        ) from None

    def sage(q, k, v, *, causal: bool = False, scale: float | None = None, mask: torch.Tensor | None = None, smooth_k: bool = True):
        b, h, h_kv, n_q, n_k, d = check_shapes(q, k, v, causal)
        if not q.is_cuda:
            raise AttentionUnavailable(f"attention 'sage' runs on CUDA tensors only, got {q.device}; {CPU_ALTERNATIVE}")
        if mask is not None:
            raise UnsupportedCall("the sage kernel takes no attention mask")
        if d not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedCall(f"the sage kernel supports head dims {SUPPORTED_HEAD_DIMS}, not {d}")
        if causal and n_q != n_k:
            if n_q != 1:
                raise UnsupportedCall("the sage kernel has no causal mask for a query shorter than the keys")
            causal = False  # one query at the end of the sequence sees every key
        if smooth_k:
            k = k.clone()  # sageattn subtracts the mean from k in place
        return sageattn(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale, smooth_k=smooth_k)

    return sage


def raw_sageattn():
    """The unwrapped ``sageattention.sageattn`` (the kernel notebook checks what it does to its inputs)."""
    load_kernel()
    from sageattention import sageattn

    return sageattn

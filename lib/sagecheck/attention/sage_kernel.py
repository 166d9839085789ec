"""The real SageAttention kernel (``sageattention.sageattn``), CUDA only.

Wrapped so that it keeps the registry's contract:

* the caller's tensors are never changed: ``sageattn`` 1.0.6 smooths K *in place*
  (``core.py``: ``k -= km``), which would corrupt a KV cache; we pass it a copy of K. SageAttention 2
  hands the mean to its quantization kernels and leaves K alone (08 checks the raw kernel's inputs),
  so it gets K itself: a copy would add a memory pass to every timed call;
* causal attention with a query shorter than the keys (chunked prefill) and boolean
  masks are not supported by the kernel: :class:`UnsupportedCall`, so that the caller
  can fall back to the baseline (and count it). A single query (decode) attends to
  every key, so it runs as non-causal;
* head dims other than 64, 96 and 128 are :class:`UnsupportedCall` too.

Which function runs: ``sageattn`` ("auto": it dispatches by GPU; SageAttention 2 on an H200 calls
``sageattn_qk_int8_pv_fp8_cuda_sm90``) or one named by the ``sage_kernel`` parameter (:func:`select`).
:func:`dispatch_probe` runs the chosen entry point once on small inputs and records the functions of
``sageattention.core`` it called, so that the report names the kernel that ran instead of assuming it.
"""

from __future__ import annotations

import functools
import types
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


AUTO = "auto"
_selected = AUTO


def select(name: str) -> None:
    """The entry point the 'sage' implementation calls from now on: ``auto`` (``sageattn``) or a named one."""
    global _selected
    _selected = name or AUTO


def selected() -> str:
    return _selected


def entry_point(name: str | None = None) -> Any:
    """The function ``name`` (default: the selected one) of the importable sageattention; :class:`AttentionUnavailable`
    naming what is installed and what it offers where it has none of that name."""
    from sagecheck.environment import sageattention_label, sageattention_package

    name = name or _selected
    try:
        import sageattention
    except ImportError as e:
        raise AttentionUnavailable(f"attention 'sage' needs the sageattention package ({e}); install it with "
                                   f"`pip install sageattention==1.0.6`, or {CPU_ALTERNATIVE}") from None
    fn = getattr(sageattention, "sageattn" if name == AUTO else name, None)
    if not callable(fn) or not (name == AUTO or name.startswith("sageattn")):
        pkg = sageattention_package()
        raise AttentionUnavailable(f"sage_kernel {name!r} is not in the installed sageattention ({sageattention_label(pkg)}); "
                                   f"it offers: auto, {', '.join(pkg['entry_points'])}")
    return fn


def dispatch_probe(device: Any = None) -> dict[str, Any]:
    """Run the selected entry point once (fp16, 1 x 2 heads x 128 tokens x 64) and record which functions of
    ``sageattention.core`` it called, in order, with their keyword arguments (e.g. ``pv_accum_dtype``): the kernel
    that ran, measured. Needs CUDA and sageattention."""
    import sageattention.core as core

    fn = entry_point()
    calls: list[dict[str, Any]] = []
    originals = {}
    for attr, value in vars(core).items():
        if isinstance(value, types.FunctionType) and value.__module__.startswith("sageattention") and value is not fn:
            originals[attr] = value

            def recorder(*args: Any, __name: str = attr, __fn: Any = value, **kwargs: Any) -> Any:
                calls.append({"function": __name, "defined_in": f"{__fn.__module__}.{__fn.__qualname__}",
                              "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}})
                return __fn(*args, **kwargs)

            setattr(core, attr, functools.wraps(value)(recorder))
    try:
        q, k, v = (torch.randn(1, 2, 128, 64, dtype=torch.float16, device=device or "cuda") for _ in range(3))
        fn(q, k, v, tensor_layout="HND", is_causal=False)
        if q.is_cuda:
            torch.cuda.synchronize()
    finally:
        for attr, value in originals.items():
            setattr(core, attr, value)
    kernels = [c for c in calls if c["function"].startswith("sageattn_")] or calls[-1:]
    return {"entry_point": "sageattn" if _selected == AUTO else _selected, "kernel": kernels[0]["function"] if kernels else "?",
            "kernel_kwargs": kernels[0]["kwargs"] if kernels else {}, "calls": [c["function"] for c in calls]}


def kernel_info(probe: bool = False) -> dict[str, Any]:
    """What 'sage' runs: the importable sageattention (version, generation, where), the entry point selected and, with
    ``probe`` on a CUDA machine, the kernel it dispatched to (:func:`dispatch_probe`)."""
    from sagecheck.environment import sageattention_label, sageattention_package

    pkg = sageattention_package()
    if not pkg["installed"]:
        return {"name": "sage", "variant": "not installed", "version": None, "selected": _selected}
    variant = ("v1 Triton kernels (per-block INT8 QK^T, FP16 PV)" if pkg["generation"] == 1
               else "v2 (INT8 QK^T; FP8 PV on Ada and Hopper; sageattn dispatches by GPU)")
    out = {"name": "sage", "package": "sageattention", "version": sageattention_label(pkg), "generation": pkg["generation"],
           "variant": variant, "selected": _selected, "entry_points": pkg["entry_points"]}
    if probe:
        if not torch.cuda.is_available():
            out["dispatched"] = "not probed: no CUDA GPU"
        else:
            try:
                out["dispatched"] = dispatch_probe()
            except Exception as e:  # noqa: BLE001 - the report says why, in one line
                out["dispatched"] = f"probe failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def load_kernel():
    """Import the kernel or raise :class:`AttentionUnavailable` saying why and what to use instead."""
    if not torch.cuda.is_available():
        raise AttentionUnavailable(
            f"attention 'sage' needs a CUDA GPU, and this machine has none (torch {torch.__version__}); {CPU_ALTERNATIVE}"
        )
    sageattn = entry_point()
    from sagecheck.environment import sageattention_smooths_out_of_place

    smooths_in_place = not sageattention_smooths_out_of_place()

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
        if smooth_k and smooths_in_place:
            k = k.clone()  # sageattn 1.0.6 subtracts the mean from k in place
        return sageattn(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale, smooth_k=smooth_k)

    return sage


def raw_sageattn():
    """The unwrapped selected entry point (the kernel notebook checks what it does to its inputs)."""
    load_kernel()
    return entry_point()


def dispatched_label(probe: dict[str, Any], leave_out: tuple[str, ...] = ()) -> str:
    """:func:`dispatch_probe`'s record in one line: ``entry point -> kernel (its keyword arguments)``, less the
    arguments named in ``leave_out`` (e.g. those of the probe's own call, where the label describes other calls)."""
    kw = ", ".join(f"{k}={v}" for k, v in probe["kernel_kwargs"].items() if k not in leave_out)
    return f"{probe['entry_point']} -> {probe['kernel']}" + (f" ({kw})" if kw else "")


def facts(info: dict[str, Any]) -> dict[str, Any]:
    """:func:`kernel_info` as the rows of 00's table."""
    if info.get("version") is None:
        return {"sageattention": "not installed", "entry point": info.get("selected", AUTO)}
    d = info.get("dispatched", "not probed (the run's device is no GPU)")
    if isinstance(d, dict):
        d = dispatched_label(d)
    return {"sageattention": info["version"], "generation": f"{info['generation']}: {info['variant']}",
            "entry point": info["selected"] + (" (sageattn)" if info["selected"] == AUTO else ""),
            "kernel that ran (probe)": d, "entry points it offers": ", ".join(info.get("entry_points", []))}


# the emulations of sagecheck.attention and the scheme each reproduces
EMULATED_SCHEMES = {
    "sage-emulated": "SageAttention 1.0.6's scheme: INT8 Q·K^T quantized per block, FP16 P·V",
    "sage2-fp8-emulated": "SageAttention 2's sm90 scheme: INT8 Q·K^T quantized per thread, FP8 P·V (fp32+fp32 accumulation)",
}
SM90_FP8_KERNEL = "sageattn_qk_int8_pv_fp8_cuda_sm90"


def emulation_for(info: dict[str, Any]) -> tuple[str | None, str]:
    """(the emulation that reproduces the arithmetic of the kernel that ran, why), read from :func:`dispatch_probe`'s
    calls: ``sage-emulated`` for a per-block INT8 Q·K kernel with FP16 P·V (1.0.6's Triton kernel, SageAttention 2's
    ``sageattn_qk_int8_pv_fp16_triton``); ``sage2-fp8-emulated`` for SageAttention 2's Hopper kernel with its defaults
    (per-thread INT8 Q·K, per-channel FP8 V, fp32+fp32); None for any other (per-warp Q·K, the Ada FP8 kernels, the
    Ampere CUDA kernel), whose error can then be judged only against float64. Without a probe, by the package's
    generation."""
    d = info.get("dispatched")
    if isinstance(d, dict):
        calls = " ".join(d["calls"]).lower()
        kernel = d["kernel"]
        other = [w for w in ("fp8", "per_thread", "per_warp") if w in calls or w in kernel.lower()]
        if "per_block_int8" in calls and not other:
            return "sage-emulated", f"{kernel} ({', '.join(d['calls'])}) follows {EMULATED_SCHEMES['sage-emulated']}"
        kwargs = d.get("kernel_kwargs", {})
        if (kernel == SM90_FP8_KERNEL and "per_thread_int8" in calls and "per_channel_fp8" in calls
                and kwargs.get("pv_accum_dtype", "fp32+fp32") == "fp32+fp32" and kwargs.get("qk_quant_gran", "per_thread") == "per_thread"):
            return "sage2-fp8-emulated", f"{kernel} ({', '.join(d['calls'])}) follows {EMULATED_SCHEMES['sage2-fp8-emulated']}"
        return None, (f"no emulation reproduces the kernel that ran, {kernel} (calls: {', '.join(d['calls'])}; "
                      f"{', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'no keyword arguments'}); the emulations "
                      f"reproduce {'; '.join(EMULATED_SCHEMES.values())}")
    if info.get("generation") == 1:
        return "sage-emulated", f"sageattention 1.x: {EMULATED_SCHEMES['sage-emulated']}"
    return None, f"the kernel that ran was not probed ({d}); the emulations reproduce {'; '.join(EMULATED_SCHEMES.values())}"

"""MEASUREMENT ONLY: variants of sagecheck's ``sage_attn`` backend that each isolate one cause of a timing difference,
for ``benchmarks/ttft_gap.py``; registered as SGLang attention backends by this plugin (entry point
``sglang.srt.plugins``, found on PYTHONPATH through the ``.dist-info`` beside this package; ttft_gap.py puts it there
for the variants that need it), never part of sagecheck.

* ``sage_attn_shadow``: every batch the dispatch rule sends to the kernel runs the kernel path as ``sage_attn`` does
  (its launches, its temporaries, its streams) and then Triton's extend kernel, whose output is the one returned. The
  server's outputs, and so the KV values its decode reads, are the baseline's; whatever the kernel path leaves behind
  in the process is still there. The probe for issue 35's decode after a kernel prefill (0.97x triton's with
  SageAttention 2 on the H100, 1.00x with 1.0.6): if the shadow decodes at 1.00x, the slowdown comes with the
  different values the kernel's prefill writes; if at 0.97x, with something the kernel path leaves in the process.
* ``sage_attn_release``: ``sage_attn`` as served, but after each batch on the kernel the caching allocator's unused
  memory is handed back once, before the next batch (SageAttention 2's calls take theirs from the default stream's
  pool, held until SGLang's cache flush after the request). If it decodes at 1.00x where ``sage_attn`` does not, the
  held memory is what slows the decode.
"""

from __future__ import annotations

# backend name: its class in sagecheck_probes.backends
PROBES = {"sage_attn_shadow": "ShadowKernelBackend", "sage_attn_release": "ReleaseAfterKernelBackend"}


def register() -> None:
    from sglang.srt import server_args
    from sglang.srt.layers.attention import attention_registry

    for name, cls in PROBES.items():
        if name not in server_args.ATTENTION_BACKEND_CHOICES:
            server_args.add_attention_backend_choices([name])

        def create(model_runner, cls=cls):  # noqa: ANN001 - SGLang's ModelRunner
            from sagecheck_probes import backends

            return getattr(backends, cls)(model_runner)

        attention_registry.register_attention_backend(name)(create)

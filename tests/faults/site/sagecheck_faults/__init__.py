"""TEST ONLY: deliberately wrong variants of sagecheck's ``sage_attn``, each with one defect of a known class.

10_code_paths must fail exactly the path of each defect and pass the others (``tests/test_code_paths.py`` on the
stand-in; on a GPU, ``tests/faults/run_gpu.sh``). The variants are registered as SGLang attention backends by this
plugin (entry point ``sglang.srt.plugins``, found on PYTHONPATH through the ``.dist-info`` beside this package) and
are never part of sagecheck:

* ``sage_attn_prefix_fault``: a cached prefix is gathered in whole 64-token blocks, so the keys of a partial last
  block are lost: an extend over a radix-cached prefix of a length that is no multiple of 64 attends to the wrong keys
  (chunk boundaries, at multiples of the chunk size, are not touched);
* ``sage_attn_padded_decode``: decode on the kernel (``SAGE_ATTN_DECODE=sage``, CUDA graphs off) without dividing out
  the zero-padded keys the non-causal kernel counts in its softmax;
* ``sage_attn_stale_graph``: a replayed decode graph reads the sequence lengths of the step before (the newest key
  is left out), as when replay metadata is not refreshed; eager decode is right;
* ``sage_attn_head_split``: each tensor-parallel rank reads the KV heads of rank 0 (its own share of the query heads,
  the wrong KV heads): no effect on one rank;
* ``sage_attn_split_own_means``: with SageAttention 2 (the split of a prefix extend, ``SAGE_ATTN_PREFILL=batched`` on
  the stand-in), each part's keys are smoothed by their own mean, not by the request's over all its keys: the two
  log-sum-exps carry different shifts and the merge weights the prefix and the new tokens wrongly
  (:mod:`sagecheck_faults.split`);
* ``sage_attn_route_miscount``: a batch the dispatch rule sends to Triton runs on the kernel all the same, counted as
  Triton's (the route decided on stale state): its answers are near the baseline's, the census of kernel calls on a
  path its counters put on Triton is what shows it.

Defects of the kernel call itself, which the census of kernel calls (``sagecheck.census``) holds to the kernel's
contract whatever the output shows:

* ``sage_attn_causal_prefix``: an extend over a cached prefix calls the kernel causal with the new tokens only (fewer
  queries than keys), without the prefix's rows;
* ``sage_attn_prefix_fallback``: every batch with a cached prefix silently runs on Triton (no kernel call);
* ``sage_attn_wrong_scale``: every kernel call gets 1.25 times the layer's softmax scale;
* ``sage_attn_padded_kernel``: kernel decode (``SAGE_ATTN_DECODE=sage``) on a kernel that counts a partial block's
  masked-out key slots, not corrected (the stand-in's kernel does; on a GPU, 1.0.6's non-causal kernel does).
"""

from __future__ import annotations

FAULTS = {"sage_attn_prefix_fault": "prefix", "sage_attn_padded_decode": "padded_decode",
          "sage_attn_stale_graph": "stale_graph", "sage_attn_head_split": "head_split",
          "sage_attn_causal_prefix": "causal_prefix", "sage_attn_prefix_fallback": "prefix_fallback",
          "sage_attn_wrong_scale": "wrong_scale", "sage_attn_padded_kernel": "padded_kernel",
          "sage_attn_split_own_means": "split_own_means", "sage_attn_route_miscount": "route_miscount"}


def register() -> None:
    from sglang.srt import server_args
    from sglang.srt.layers.attention import attention_registry

    for name, fault in FAULTS.items():
        if name not in server_args.ATTENTION_BACKEND_CHOICES:
            server_args.add_attention_backend_choices([name])

        def create(model_runner, fault=fault):  # noqa: ANN001 - SGLang's ModelRunner
            from sagecheck_faults.backends import faulty_backend

            return faulty_backend(fault)(model_runner)

        attention_registry.register_attention_backend(name)(create)

"""TEST ONLY: a defect in sage_attn's split of a prefix extend (:mod:`sagecheck.sglang_plugin.split`), for the variant
``sage_attn_split_own_means`` (on a GPU: :class:`sagecheck_faults.backends.SplitOwnMeansFault`; on the stand-in:
``tests/standin/split_prefill.py``). Torch and sagecheck only: the stand-in imports it without SGLang."""

from __future__ import annotations

import torch

from sagecheck.sglang_plugin import split
from sagecheck.sglang_plugin.batched import attend_groups


def extend_split_own_means(kernel, q, k_new, v_new, k_prefix, v_prefix, layout, plan, scale,
                           kernel_smooths: bool = False) -> torch.Tensor:
    """The split with each part's keys smoothed by their own mean (the new keys' over the batch's new tokens, the
    prefix's over its prefix keys) instead of each request's mean over all its keys: the two log-sum-exps are shifted
    by different ``q·μ``, so the merge weights the prefix and the new tokens wrongly. A batch without a prefix is right."""
    if not layout.has_prefix:
        return split.extend_split(kernel, q, k_new, v_new, k_prefix, v_prefix, layout, plan, scale, kernel_smooths)

    def own_mean(k: torch.Tensor) -> torch.Tensor:
        return k - k.float().mean(0, keepdim=True).to(k.dtype)

    out_new, lse_new = attend_groups(kernel, q, own_mean(k_new), v_new, plan.new_groups, scale, return_lse=True)
    out_prefix, lse_prefix = split._prefix_part(kernel, q, own_mean(k_prefix), v_prefix, plan.prefix_groups, scale)
    rows = plan.rows_with_prefix
    merged, _ = split.merge_by_lse(out_prefix[rows], lse_prefix[rows], out_new[rows], lse_new[rows])
    out_new[rows] = merged
    return out_new

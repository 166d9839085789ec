"""The one signature every attention implementation has, and the two ways it can decline (see the package docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class AttentionFn(Protocol):
    """``fn(q, k, v, *, causal=False, scale=None, mask=None) -> out`` on ``[batch, heads, seq, head_dim]`` tensors."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor: ...


class AttentionUnavailable(RuntimeError):
    """The implementation cannot run on this machine (no CUDA, package missing)."""


class UnsupportedCall(ValueError):
    """The implementation cannot compute this call (a mask, a shape); the baseline can."""

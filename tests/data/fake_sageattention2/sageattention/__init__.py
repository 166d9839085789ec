"""A stand-in of a SageAttention 2 source build for the tests (no package metadata, FP8 entry points by name): its
``sageattn`` dispatches as SageAttention 2's does on sm90, in plain torch."""
from .core import sageattn, sageattn_qk_int8_pv_fp16_triton, sageattn_qk_int8_pv_fp8_cuda, sageattn_qk_int8_pv_fp8_cuda_sm90

"""Kernel families; importing this package registers every kind."""
from . import (adamw, attention, attention_tc, attention_wgmma, bias, cast, colsum, cross_entropy, embedding,  # noqa: F401
               gemm, gemm_tc, gemm_wgmma, rmsnorm, rope, swiglu)

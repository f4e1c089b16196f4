"""Kernel families; importing this package registers every kind."""
from . import adamw, attention, bias, colsum, cross_entropy, embedding, gemm, gemm_tc, rmsnorm, rope, swiglu  # noqa: F401

"""Kernel families; importing this package registers every kind."""
from . import adamw, attention, bias, cast, colsum, cross_entropy, embedding, gemm, gemm_tc, rmsnorm, rope, swiglu  # noqa: F401

"""Kernel families; importing this package registers every kind."""
from . import adamw, bias, colsum, cross_entropy, embedding, rmsnorm, rope, swiglu  # noqa: F401

"""Kernel families; importing this package registers every kind."""
from . import bias, colsum, embedding, rmsnorm, rope, swiglu  # noqa: F401  (registration side effect)

"""Kernel families; importing this package registers every kind."""
from . import rmsnorm, rope  # noqa: F401  (registration side effect)

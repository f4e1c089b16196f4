"""Kernel families; importing this package registers every kind."""
from . import (adamw, attention, attention_tc, attention_wgmma, bias, cast, colsum, cross_entropy, embedding,  # noqa: F401
               gemm, gemm_tc, gemm_wgmma, rmsnorm, rope, swiglu)
from ..spec import generator_fingerprint

# The keys' fingerprint of the generator's files, taken now that the emitters are loaded from them: taken at
# the first key instead, it would describe a tree changed since (a checkout during a long import), keying
# the loaded emitters' old text as the new tree's
generator_fingerprint()

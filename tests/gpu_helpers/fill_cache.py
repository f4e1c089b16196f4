"""Child process for the disk-cache tests: fill a cache directory, print the cache stats as JSON."""
import json
import sys

from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec
from runtime import ModuleCache

SPECS = [RMSNormSpec(hidden=896, eps=1e-6), RMSNormSpec(hidden=896, eps=1e-5),
         RMSNormSpec(hidden=897, eps=1e-6, block_size=128), RopeSpec(heads=14, head_dim=64, theta=1e6),
         RopeSpec(heads=2, head_dim=64, theta=1e6), RopeSpec(heads=14, head_dim=64, theta=1e4)]

if __name__ == "__main__":
    cache = ModuleCache(sys.argv[1])
    cache.prewarm(SPECS)
    print(json.dumps(vars(cache.stats)))

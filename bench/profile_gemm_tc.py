"""One tensor-core GEMM launch to put under Nsight Compute (GPU machine).

    ncu --clock-control none --kernel-name gemm_tc --launch-skip 1 --launch-count 1 --set full \\
        python3 bench/profile_gemm_tc.py --size 4096 block_n=256 stages=3

Launches the kernel twice (the first pays for module loading) on random bf16 operands; the
trailing ``field=value`` words are GemmTCSpec fields.
"""
from __future__ import annotations

import argparse

import torch

from ptxgen.kernels.gemm_tc import GemmTCSpec
from runtime import ModuleCache
from runtime.driver import synchronize


def field(word: str) -> tuple[str, int | bool | str]:
    """``stages=3`` -> ("stages", 3); true/false -> bools; anything else stays a string (dtype=f16)."""
    name, _, value = word.partition("=")
    if value.isdigit():
        return name, int(value)
    return name, {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("fields", nargs="*", help="GemmTCSpec fields, e.g. block_n=256 stages=3")
    ns = ap.parse_args()
    spec = GemmTCSpec(**dict(field(w) for w in ns.fields))
    s = ns.size
    a, b = (torch.randn(s, s, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(s, s, device="cuda")
    launch = ModuleCache().get(spec).bind(*spec.launch_dims(s, s),
                                          *spec.arguments(a.data_ptr(), b.data_ptr(), c.data_ptr(), s, s, s))
    for _ in range(2):
        launch()
    synchronize()
    print(f"{spec}: ran twice at {s}^3")


if __name__ == "__main__":
    main()

"""The ceiling of each tensor-core instruction on this GPU (GPU machine): how fast mma.sync
m16n8k16 and wgmma m64n256k16 can go with nothing in the way, beside cuBLAS in the same process.

    PYTHONPATH=$PWD python3 bench/mma_peak.py [--json FILE]

A GEMM on an instruction can be no faster than the instruction itself: this tells whether a GEMM
that trails cuBLAS is held back by its own feeding and scheduling, or by the instruction it is
built on. Every warp runs ``chains`` independent accumulator sets from registers (mma.sync), or
every warpgroup back-to-back wgmmas from one shared tile (wgmma), with no memory traffic in the loop.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from harness import time_ms, write_json
from ptxgen.builder import Addr, KernelBuilder, T
from ptxgen.spec import KernelSpec, Target
from runtime import ModuleCache

ITERS = 4096
BLOCKS_PER_SM = 2
SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


@dataclass(frozen=True)
class MmaPeakSpec(KernelSpec):
    """Not a library kernel (unregistered): ``iters`` rounds of ``chains`` independent mma.syncs a
    warp, or of one wgmma m64n256k16 a warpgroup (``wgmma``), then one store per thread so the
    results stay live."""

    kind: ClassVar[str] = "mma_peak"
    wgmma: bool = False
    chains: int = 8
    warps: int = 8

    def arch(self, target: Target) -> str:
        return "sm_90a" if self.wgmma else target.arch

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("out", T.U64), ("iters", T.U32))

    def dynamic_shared_bytes(self) -> int:
        return 256 * 128 if self.wgmma else 0  # 256 rows of 64 K: the B tile, whose first 64 rows are A's

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(32 * self.warps)
        tid = b.special("%tid.x")
        one = b.mov(0x3F803F80, T.B32)  # a bf16 pair of 1.0
        if self.wgmma:
            acc = [b.mov(0.0, T.F32) for _ in range(128)]
            smem = b.addr_of(b.dynamic_shared("tiles", align=1024))
            desc = b.or_(b.cvt(T.U64, b.shr(smem, 4)), (1 << 62) | (64 << 32) | (1 << 16), T.B64)
            scale_d = b.setp("ne", b.mov(1, T.U32), 0)
            with b.loop(b.ld_param("iters")):
                b.wgmma_fence()
                for _ in range(self.chains):
                    b.wgmma(acc, desc, desc, "bf16", 256, scale_d)
                b.wgmma_commit()
                b.wgmma_wait(0)
            chains = [acc]
        else:
            a_frag, b_frag = [one] * 4, [one] * 2
            chains = [[b.mov(0.0, T.F32) for _ in range(4)] for _ in range(self.chains)]
            with b.loop(b.ld_param("iters")):
                for acc in chains:
                    b.mma_m16n8k16(acc, a_frag, b_frag, "bf16")
        total = b.mov(0.0, T.F32)
        for acc in chains:
            for r in acc:
                b.add(total, r, out=total)
        index = b.add(b.mul(b.special("%ctaid.x"), 32 * self.warps), tid)
        b.st("global", Addr(b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(index, 4))), total)

    def flops(self, blocks: int, iters: int) -> float:
        per_issue = 2 * 64 * 256 * 16 if self.wgmma else 2 * 16 * 8 * 16
        issuers = self.warps // 4 if self.wgmma else self.warps  # warpgroups issue wgmma, warps mma.sync
        return float(blocks * issuers * iters * self.chains * per_issue)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args()
    cache = ModuleCache(use_disk=False)
    blocks = SMS * BLOCKS_PER_SM
    out = torch.empty(blocks * 32 * 32, device="cuda")
    rows = {}
    for spec in (MmaPeakSpec(), MmaPeakSpec(chains=16), MmaPeakSpec(warps=16), MmaPeakSpec(chains=4, warps=16),
                 MmaPeakSpec(wgmma=True, chains=4, warps=4), MmaPeakSpec(wgmma=True, chains=4, warps=8)):
        launch = cache.get(spec).bind(blocks, 32 * spec.warps, out.data_ptr(), ITERS)
        ms = time_ms(launch, reps=10, warmup=2)
        name = f"{'wgmma m64n256k16' if spec.wgmma else 'mma.sync m16n8k16'} x{spec.chains}, {spec.warps} warps"
        rows[name] = spec.flops(blocks, ITERS) / ms / 1e9
    for size in (4096, 8192):
        a, bt = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = time_ms(lambda: torch.matmul(a, bt.t()), reps=10, warmup=2)
        rows[f"cuBLAS bf16 {size}^3 (random operands)"] = 2.0 * size ** 3 / ms / 1e9
    print(f"\n== tensor-core instruction ceilings (bf16 in, fp32 accumulate)\n  {'instruction':<44} {'TFLOP/s':>9}")
    for name, tflops in rows.items():
        print(f"  {name:<44} {tflops:9.1f}")
    write_json(ns.json, {"TFLOPs": rows})


if __name__ == "__main__":
    main()

"""Stream-K's schedule (ptxgen/kernels/tma_pipeline.py) on the CPU: the host's reference covers
every slice of every tile once, the partial sums flow one way (a tile's later runs, each a block's
first, to its first run), the kernel's own u32 arithmetic (run through the interpreter) computes
the same runs, and the host's choice of tiles to share pays where the last wave is thin.
The GEMM itself sharing tiles out: tests/test_gemm_tc_cuda.py (GPU)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from ptxgen.builder import Addr, KernelBuilder, T
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.kernels.tma_pipeline import StreamK, stream_k_bounds, stream_k_finisher, stream_k_units
from ptxgen.spec import KernelSpec
from ptxsim import launch

# (tiles, slices, blocks, sk_tiles): runs shorter than a tile, longer than one, blocks with none,
# every tile shared, none shared
SCHEDULES = [(40, 16, 7, 5), (40, 16, 7, 12), (15, 16, 5, 15), (4, 4, 7, 1), (448, 152, 132, 184),
             (266, 128, 132, 134), (63, 128, 132, 63), (10, 3, 4, 0), (9, 1, 4, 1)]


@pytest.mark.parametrize("tiles, slices, blocks, sk", SCHEDULES)
def test_every_slice_of_every_tile_is_multiplied_once(tiles, slices, blocks, sk):
    seen = np.zeros((tiles, slices), int)
    for g in range(blocks):
        pos = 0
        for tile, k0, count, at in stream_k_units(g, blocks, tiles, slices, sk):
            assert count > 0 and at == pos, "a block's runs follow one another through its ring"
            seen[tile, k0:k0 + count] += 1
            pos += count
    assert (seen == 1).all()


@pytest.mark.parametrize("tiles, slices, blocks, sk", SCHEDULES)
def test_partial_sums_flow_from_later_runs_each_a_blocks_first_to_the_tiles_first_run(tiles, slices, blocks, sk):
    """So no run waits on a run that waits: a tile's first run (k0 = 0) adds the partial sums of
    the later blocks that share it, each of which made its run first, before anything else."""
    for tile in range(sk):
        first, later = stream_k_finisher(tile, blocks, slices, sk)
        assert [u[1] for u in stream_k_units(first, blocks, tiles, slices, sk) if u[0] == tile] == [0]
        assert later == sorted(later) and all(g > first for g in later)
        for g in later:
            assert stream_k_units(g, blocks, tiles, slices, sk)[0][0] == tile  # its first run
            assert stream_k_units(g, blocks, tiles, slices, sk)[0][1] > 0
        # the kernel finds them as the blocks up to the one holding the tile's last slice, less
        # those with no shared slice at all
        last = ((tile * slices + slices) * blocks - 1) // (sk * slices)
        holders = [g for g in range(first + 1, last + 1) if len(set(stream_k_bounds(g, blocks, sk * slices))) == 2]
        assert holders == later


@dataclass(frozen=True)
class _Schedule(KernelSpec):
    """Not a kernel of the library: writes each block's runs as StreamK computes them, and for a
    run at a tile's start the last block holding that tile, so the interpreter can check them."""

    kind: ClassVar[str] = "stream_k_schedule"
    most: int = 8  # runs a block, at most

    def params(self):
        return (("out", T.U64), ("tiles", T.U32), ("slices", T.U32), ("sk_tiles", T.U32))

    def outputs(self):
        return ("out",)

    def build(self, b: KernelBuilder) -> None:
        block, blocks = b.special("%ctaid.x"), b.special("%nctaid.x")
        sk = StreamK(b, b.ld_param("tiles"), b.ld_param("slices"), block, blocks, b.ld_param("sk_tiles"))
        row = b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(block, 4 * (1 + 5 * self.most)))
        b.st("global", Addr(row), sk.count)
        with b.loop(sk.count, "run") as j:
            tile, k0, count, pos = sk.unit(j)
            at = b.add(row, b.mul_wide(b.mad(j, 5, 1), 4))
            for i, v in enumerate((tile, k0, count, pos)):
                b.st("global", Addr(at, 4 * i), v)
            b.st("global", Addr(at, 16), sk.last_block(tile), guard=b.setp("lt", tile, b.ld_param("sk_tiles")))

    @classmethod
    def examples(cls):
        return [cls()]


@pytest.mark.parametrize("tiles, slices, blocks, sk", [s for s in SCHEDULES if s[2] <= 8])
def test_the_kernels_schedule_arithmetic_is_the_reference(tiles, slices, blocks, sk):
    spec = _Schedule()
    out = np.zeros((blocks, 1 + 5 * spec.most), np.uint32)
    out = launch(spec, ((blocks, 1, 1), 32), out, tiles, slices, sk)[0]
    for g in range(blocks):
        units = stream_k_units(g, blocks, tiles, slices, sk)
        assert out[g, 0] == len(units)
        got = out[g, 1:1 + 5 * len(units)].reshape(-1, 5)
        assert [tuple(int(x) for x in r[:4]) for r in got] == units
        for (tile, k0, _, _), r in zip(units, got):
            if tile < sk and k0 == 0:
                first, later = stream_k_finisher(tile, blocks, slices, sk)
                assert r[4] == (later[-1] if later else first)  # the block holding its last slice


@pytest.mark.parametrize("m, n, k, blocks, shared", [
    (8192, 896, 9728, 132, True),    # gate/up's dX: 448 tiles, 52 past three waves
    (4864, 896, 8192, 132, True),    # down's dW: 266 tiles, 2 past two waves
    (128, 896, 8192, 132, True),     # a narrow dW: 7 tiles on 132 SMs
    (8192, 9728, 896, 132, False),   # gate/up's forward: 36.8 waves of short tiles, left whole
    (8192, 896, 896, 132, False),    # 448 tiles of 14 slices: a run would be a slice or two
    (128, 128, 704, 264, False)])    # one tile of 11 slices: 11 hand-overs would cost more
def test_tiles_are_shared_out_where_the_last_wave_is_thin(m, n, k, blocks, shared):
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, stream_k=True)
    sk = spec.stream_k_tiles(m, n, k, blocks)
    assert (sk > 0) == shared
    tiles = -(-m // 128) * -(-n // 128)
    assert sk == 0 or (tiles - sk) % blocks == 0  # the rest in full waves
    assert GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6).stream_k_tiles(m, n, k, blocks) == 0


def test_sharing_needs_the_workspace_and_a_stream_k_spec():
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, stream_k=True)
    spec.arguments(1, 2, 3, 1000, 520, 1000)  # nothing shared: no workspace needed
    with pytest.raises(ValueError, match="needs the workspace"):
        spec.arguments(1, 2, 3, 1000, 520, 1000, sk_tiles=5)
    with pytest.raises(ValueError, match="at most the 40 tiles"):
        spec.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5, sk_tiles=41)
    with pytest.raises(ValueError, match="no split-K"):
        spec.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5, sk_tiles=5, splits=2)
    plain = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6)
    with pytest.raises(ValueError, match="stream_k spec's"):
        plain.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5)

"""A GEMM's split tail (ptxgen/kernels/tma_pipeline.py) on the CPU: the host's reference schedule
covers every slice of every tile once, the partial sums flow one way (a tail tile's parts past 0,
dealt first, to its part 0), the kernel's own u32 arithmetic (run through the interpreter)
computes the same runs, and the host cuts the tail where the last wave is thin.
The GEMM itself: tests/test_gemm_tc_cuda.py (GPU)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from ptxgen.builder import Addr, KernelBuilder, T
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.kernels.tma_pipeline import SplitTail, split_tail_slots, split_tail_units
from ptxgen.spec import KernelSpec
from ptxsim import launch

# (tiles, slices, blocks, parts): one round of pairs and two, a tail of one tile cut in 8, no tail,
# more blocks than tiles, no cut
SCHEDULES = [(40, 16, 7, 2), (40, 16, 7, 4), (13, 16, 4, 8), (4, 4, 7, 4), (448, 152, 132, 2),
             (266, 128, 132, 16), (63, 128, 132, 4), (14, 6, 7, 3), (10, 3, 4, 1)]


@pytest.mark.parametrize("tiles, slices, blocks, parts", SCHEDULES)
def test_every_slice_of_every_tile_is_multiplied_once(tiles, slices, blocks, parts):
    seen = np.zeros((tiles, slices), int)
    for g in range(blocks):
        pos = 0
        for tile, k0, count, at in split_tail_units(g, blocks, tiles, slices, parts):
            assert count > 0 and at == pos, "a block's runs follow one another through its ring"
            seen[tile, k0:k0 + count] += 1
            pos += count
    assert (seen == 1).all()


@pytest.mark.parametrize("tiles, slices, blocks, parts", SCHEDULES)
def test_a_tail_tiles_part_0_waits_only_for_parts_that_wait_for_nothing(tiles, slices, blocks, parts):
    """Every run a block makes before a part past 0 is a whole tile or another part past 0 (none
    waits), so the parts a part 0 waits for all finish; each part past 0 has its own slot."""
    tail, slots = tiles % blocks, []
    for g in range(blocks):
        waiting = False
        for tile, k0, count, _ in split_tail_units(g, blocks, tiles, slices, parts):
            cut = count < slices
            assert not (waiting and cut and k0 > 0), "a part past 0 after a part 0 on one block"
            waiting |= cut and k0 == 0
            if k0 > 0:
                slots.append(split_tail_slots(tile, blocks, tiles, parts)[k0 // count - 1])
    assert sorted(slots) == list(range(tail * (parts - 1)))


@dataclass(frozen=True)
class _Schedule(KernelSpec):
    """Not a kernel of the library: writes each block's runs as SplitTail computes them, and a
    cut tile's slot of part 1, so the interpreter can check them against the reference."""

    kind: ClassVar[str] = "split_tail_schedule"
    most: int = 8  # runs a block, at most

    def params(self):
        return (("out", T.U64), ("tiles", T.U32), ("slices", T.U32), ("parts", T.U32))

    def outputs(self):
        return ("out",)

    def build(self, b: KernelBuilder) -> None:
        block, blocks = b.special("%ctaid.x"), b.special("%nctaid.x")
        tail = SplitTail(b, b.ld_param("tiles"), b.ld_param("slices"), block, blocks, b.ld_param("parts"))
        row = b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(block, 4 * (1 + 5 * self.most)))
        b.st("global", Addr(row), tail.count)
        with b.loop(tail.count, "run") as j:
            tile, k0, count, pos = tail.unit(j)
            at = b.add(row, b.mul_wide(b.mad(j, 5, 1), 4))
            for i, v in enumerate((tile, k0, count, pos, tail.slot(tile, b.mov(1, T.U32)))):
                b.st("global", Addr(at, 4 * i), v)

    @classmethod
    def examples(cls):
        return [cls()]


@pytest.mark.parametrize("tiles, slices, blocks, parts", SCHEDULES)
def test_the_kernels_schedule_arithmetic_is_the_reference(tiles, slices, blocks, parts):
    spec = _Schedule()
    out = np.zeros((blocks, 1 + 5 * spec.most), np.uint32)
    out = launch(spec, ((blocks, 1, 1), 32), out, tiles, slices, parts)[0]
    for g in range(blocks):
        units = split_tail_units(g, blocks, tiles, slices, parts)
        assert out[g, 0] == len(units)
        got = out[g, 1:1 + 5 * len(units)].reshape(-1, 5)
        assert [tuple(int(x) for x in r[:4]) for r in got] == units
        for (tile, _, count, _), r in zip(units, got):
            if count < slices:
                assert r[4] == split_tail_slots(tile, blocks, tiles, parts)[0]


@pytest.mark.parametrize("m, n, k, blocks, parts", [
    (8192, 896, 9728, 132, 2),     # gate/up's dX: 448 tiles, 52 past three waves
    (8192, 896, 151936, 132, 2),   # the LM head's dX
    (4864, 896, 8192, 132, 2),     # down's dW: 266 tiles, 2 past two waves (more parts: more hand-overs)
    (128, 896, 8192, 132, 2),      # a narrow dW: 7 tiles on 132 SMs
    (8192, 896, 896, 132, 1),      # o_proj's forward: 52 tail tiles of 14 slices; a hand-over costs more
    (8192, 9728, 896, 132, 1),     # gate/up's forward: 112 tail tiles, halves would take two rounds
    (128, 128, 704, 264, 1)])      # one tile of 11 slices: 11 parts of one would cost 10 hand-overs
def test_the_tail_is_cut_where_the_last_wave_is_thin(m, n, k, blocks, parts):
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, split_tail=True)
    assert spec.tail_parts(m, n, k, blocks) == parts
    assert GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6).tail_parts(m, n, k, blocks) == 1


def test_a_split_tail_needs_the_workspace_equal_parts_and_a_split_tail_spec():
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, split_tail=True)
    spec.arguments(1, 2, 3, 1000, 520, 1000)  # no cut: no workspace needed
    with pytest.raises(ValueError, match="needs split_tail, the blocks launched and the workspace"):
        spec.arguments(1, 2, 3, 1000, 520, 1000, tail_parts=2, blocks=7)
    with pytest.raises(ValueError, match="no split-K"):  # its schedule covers one product's tiles, not splits'
        spec.arguments(1, 2, 3, 1000, 520, 1000, splits=2)
    for parts in (3, 32, 0):  # 16 slices: 3 does not divide them; at most 16 parts
        with pytest.raises(ValueError, match="must divide the 16 slices"):
            spec.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5, tail_parts=parts, blocks=7)
    with pytest.raises(ValueError, match="at most 2 to each of 7 blocks"):  # 5 tail tiles x 4 > 14
        spec.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5, tail_parts=4, blocks=7)
    plain = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6)
    with pytest.raises(ValueError, match="split_tail spec's"):
        plain.arguments(1, 2, 3, 1000, 520, 1000, partials=4, flags=5)

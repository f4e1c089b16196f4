"""A pointer argument is checked against the alignment its kernel's PTX needs, read from the PTX
itself: the widest global access made through it (a 16-byte vector load needs 16; one int32 per
row needs 4), so no hand-written declaration can refuse a valid view or pass a misaligned one."""
import pytest

from ptxgen.builder import T
from ptxgen.kernels.cross_entropy import CrossEntropySpec
from ptxgen.kernels.embedding import EmbeddingBackwardSpec, EmbeddingSpec
from ptxgen.ptxtext import pointer_alignments
from ptxgen.registry import kinds

HEADER = ".visible .entry k(\n.param .u64 k_param_rows,\n.param .u64 k_param_ids,\n.param .u64 k_param_out\n)\n{\n"


def kernel(body: str) -> str:
    return HEADER + body + "\nret;\n}\n"


def test_the_widest_access_through_each_pointer_is_its_alignment():
    text = kernel("""
    ld.param.u64 %rd1, [k_param_rows];
    cvta.to.global.u64 %rd2, %rd1;
    ld.param.u64 %rd3, [k_param_ids];
    ld.param.u64 %rd4, [k_param_out];
    mul.wide.u32 %rd5, %r1, 16;
    add.u64 %rd6, %rd2, %rd5;
    ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd6+16];
    ld.global.nc.s32 %s1, [%rd3];
    st.global.v2.b16 [%rd4], {%h1, %h2};""")
    assert pointer_alignments(text) == {"rows": 16, "ids": 4, "out": 4}


def test_a_pointer_carried_around_a_loop_keeps_its_origin():
    text = kernel("""
    ld.param.u64 %rd1, [k_param_out];
    mov.u64 %rd9, %rd7;
$L_loop:
    st.global.v4.b32 [%rd9], {%r1, %r2, %r3, %r4};
    add.u64 %rd8, %rd9, 64;
    mov.u64 %rd9, %rd8;
    mov.u64 %rd7, %rd1;
    @%p1 bra $L_loop;
    ld.param.u64 %rd2, [k_param_ids];
    cp.async.cg.shared.global [%r5], [%rd2], 16, %r6;
    ld.param.u64 %rd3, [k_param_rows];
    cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%r7], [%rd3, {%r8, %r9}], [%r10];""")
    assert pointer_alignments(text) == {"out": 16, "ids": 16, "rows": 64}  # rows: a TMA tensor map


def test_a_global_access_it_cannot_size_is_an_error_not_a_guess():
    text = kernel("ld.param.u64 %rd1, [k_param_out];\nst.global.weird [%rd1], %r1;")
    with pytest.raises(ValueError, match="no element type"):
        pointer_alignments(text)
    text = kernel("ld.param.u64 %rd1, [k_param_out];\nmultimem.ld_reduce.add.f32 %f1, [%rd1];")
    with pytest.raises(ValueError, match="does not know"):
        pointer_alignments(text)


@pytest.mark.parametrize("access, width", [
    ("ld.volatile.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2];", 16),
    ("ld.relaxed.gpu.global.v2.f32 {%f1, %f2}, [%rd2];", 8),
    ("ld.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2];", 16),         # generic: may be global
    ("atom.global.add.f32 %f1, [%rd2], %f2;", 4),
    ("red.global.add.f32 [%rd2], %f2;", 4),
    ("cp.async.cg.shared.global.L2::128B [%r1], [%rd2], 16;", 16),
    ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2], 256, [%r3];", 16),
    ("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd2, {%r1, %r3}], [%r4];", 64),
    ("ld.shared.v4.f32 {%f1, %f2, %f3, %f4}, [%r9];", None)])  # not global, not from the pointer
def test_every_form_of_global_access_is_seen(access, width):
    text = kernel(f"ld.param.u64 %rd1, [k_param_rows];\ncvta.to.global.u64 %rd2, %rd1;\n{access}")
    assert pointer_alignments(text).get("rows") == width


def test_a_value_loaded_through_a_pointer_is_data_not_that_pointer():
    """ids[i] indexes the table: the table's 16-byte loads say nothing of the ids' alignment."""
    text = kernel("""
    ld.param.u64 %rd1, [k_param_ids];
    ld.param.u64 %rd2, [k_param_rows];
    ld.global.nc.s32 %s1, [%rd1];
    mul.wide.s32 %rd3, %s1, 3584;
    add.u64 %rd4, %rd2, %rd3;
    ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd4];
    ld.param.u64 %rd5, [k_param_out];
    mov.b64 {%r1, %r2}, %rd5;
    mov.b64 %rd6, {%r2, %r1};
    st.global.v2.f32 [%rd6], {%f1, %f2};""")
    assert pointer_alignments(text) == {"ids": 4, "rows": 16, "out": 8}


def test_per_row_indices_and_values_need_only_their_own_width():
    spec = CrossEntropySpec(vocab=151936, ignore_index=-100)
    assert {n: spec.pointer_alignment(n) for n in ("logits", "targets", "loss", "dlogits")} == \
        {"logits": 16, "targets": 4, "loss": 4, "dlogits": 16}
    assert EmbeddingSpec(dim=896).pointer_alignment("ids") == 4
    assert {EmbeddingBackwardSpec(dim=896).pointer_alignment(n) for n in ("order", "seg_start", "seg_id")} == {4}


@pytest.mark.parametrize("kind", sorted(kinds()))
def test_every_registered_kernel_dereferences_each_pointer_it_takes(kind):
    for spec in kinds()[kind].examples():
        for name, t in spec.params():
            if t is T.U64:
                assert spec.pointer_alignment(name) in (2, 4, 8, 16, 64), (spec, name)

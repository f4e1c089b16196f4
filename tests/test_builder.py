import pytest

from ptxgen.builder import Addr, KernelBuilder, PtxBuildError, T, f32_hex, f64_hex, immediate


def builder(params=(("p", T.U64), ("n", T.U32))):
    return KernelBuilder("k", "sm_90", (8, 5), params)


def test_float_immediates_are_exact_bits():
    assert f32_hex(1e-6) == "0f358637BD"
    assert f32_hex(1e-5) == "0f3727C5AC"
    assert f32_hex(-0.0) == "0f80000000" and f32_hex(0.0) == "0f00000000"
    assert f64_hex(1.0) == "0d3FF0000000000000"
    assert f64_hex(1e6) == "0d412E848000000000"
    assert f32_hex(float("-inf")) == "0fFF800000"


def test_integer_immediates_are_range_checked_and_float_ones_refused():
    assert immediate(7, T.U32) == "7"
    assert immediate(1, T.F32) == "0f3F800000"
    with pytest.raises(PtxBuildError, match="out of range"):
        immediate(-1, T.U32)
    with pytest.raises(PtxBuildError, match="float immediate"):
        immediate(1.5, T.S32)
    with pytest.raises(PtxBuildError, match="not a number"):
        immediate(True, T.U32)
    with pytest.raises(PtxBuildError, match="overflows f32"):
        f32_hex(1e39)


def test_module_header_params_and_register_declarations():
    b = builder()
    n = b.ld_param("n")
    b.add(n, 1)
    b.ret()
    text = b.text()
    assert text.startswith(".version 8.5\n.target sm_90\n.address_size 64\n")
    assert ".visible .entry k(\n\t.param .u64 k_param_p,\n\t.param .u32 k_param_n\n)" in text
    assert "\t.reg .u32 %r<3>;" in text
    assert "\tadd.u32 %r2, %r1, 1;" in text


def test_wrong_typed_operands_fail_at_build_time_naming_the_instruction():
    b = builder()
    n = b.ld_param("n")
    x = b.mov(1.0, T.F32)
    with pytest.raises(PtxBuildError, match=r"add.rn.f32: b is %r1 of type .u32, expected .f32"):
        b.add(x, n)
    with pytest.raises(PtxBuildError, match="address register"):
        b.ld("global", T.F32, Addr(n))
    with pytest.raises(PtxBuildError, match="not a .pred register"):
        b.bra(b.new_label("x"), guard=n)
    with pytest.raises(PtxBuildError, match="has no parameter"):
        b.ld_param("q")
    with pytest.raises(PtxBuildError, match="sin.f64 does not exist"):
        b.fn("sin", b.mov(1.0, T.F64))
    with pytest.raises(PtxBuildError, match="cannot infer"):
        b.add(1, 2)


def test_same_size_integer_and_bit_registers_are_compatible():
    b = builder()
    n = b.ld_param("n")
    s = b.mov(3, T.S32)
    d = b.add(n, s)  # add.u32 with an s32 operand: PTX allows same-size integers
    f = b.mov(1.0, T.F32)
    g = b.shfl("bfly", f, 16)  # .b32 shuffle of an f32 value
    text = b.text()
    assert f"\tadd.u32 {d}, {n}, {s};" in text
    assert f"\tshfl.sync.bfly.b32 {g}, {f}, 16, 31, 4294967295;" in text


def test_predicated_vector_loads_and_guards():
    b = builder()
    p = b.cvta_global(b.ld_param("p"))
    pred = b.setp("lt", b.ld_param("n"), 4)
    vals = b.ld("global", T.F32, Addr(p, 16), 4, guard=pred)
    b.st("global", Addr(p), list(vals), guard=~pred)
    text = b.text()
    assert "@%p1 ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2+16];" in text
    assert "@!%p1 st.global.v4.f32 [%rd2], {%f1, %f2, %f3, %f4};" in text


def test_shared_and_table_symbols_get_unique_names():
    b = builder()
    a = b.shared_array("buf", T.F32, 8)
    c = b.shared_array("buf", T.F32, 8)
    t = b.global_table("tbl", T.F64, [1.0, 0.5])
    assert a.name != c.name
    text = b.text()
    assert ".global .align 8 .f64 tbl[2] = {0d3FF0000000000000, 0d3FE0000000000000};" in text
    assert f".shared .align 4 .f32 {c.name}[8];" in text
    assert t.name == "tbl" and t.count == 2


def test_atomics_conversions_and_float_functions_render_as_ptx():
    b = builder()
    p = b.cvta_global(b.ld_param("p"))
    x = b.mov(2.0, T.F32)
    old = b.atom("global", "add", Addr(p), x)
    b.red("global", "add", Addr(p, 4), old)
    wide = b.cvt(T.F64, x)
    back = b.cvt(T.F32, wide)
    i = b.cvt(T.S32, back)
    b.fn("rsqrt", back)
    b.fn("sqrt", back, "rn")
    text = b.text()
    for line in ("atom.global.add.f32 %f2, [%rd2], %f1;", "red.global.add.f32 [%rd2+4], %f2;",
                 "cvt.f64.f32 %fd1, %f1;", "cvt.rn.f32.f64 %f3, %fd1;", f"cvt.rzi.s32.f32 {i}, %f3;",
                 "rsqrt.approx.f32 %f4, %f3;", "sqrt.rn.f32 %f5, %f3;"):
        assert line in text


def test_the_special_functions_have_their_flush_to_zero_forms_where_ptx_does():
    b = builder()
    x = b.mov(2.0, T.F32)
    for name in ("ex2", "rcp", "rsqrt", "sqrt", "lg2", "sin", "cos"):
        b.fn(name, x, "approx.ftz")
    assert [line.split()[0] for line in b.text().splitlines() if "approx.ftz" in line] == [
        f"{name}.approx.ftz.f32" for name in ("ex2", "rcp", "rsqrt", "sqrt", "lg2", "sin", "cos")]
    with pytest.raises(PtxBuildError, match="sqrt.approx.ftz.f64 does not exist"):
        b.fn("sqrt", b.cvt(T.F64, x), "approx.ftz")


def test_dynamic_shared_memory_is_a_module_scope_extern_and_launch_bounds_precede_the_body():
    b = builder()
    tiles = b.dynamic_shared("tiles", align=1024)
    b.addr_of(tiles)
    b.launch_bounds(256, 2)
    b.ret()
    text = b.text()
    assert text.index(".extern .shared .align 1024 .b8 tiles[];") < text.index(".visible .entry k(")
    assert text.index(".maxntid 256, 1, 1") < text.index(".minnctapersm 2") < text.index("{")


def test_ldmatrix_and_cp_async_take_offsets_and_ldmatrix_fills_given_registers():
    b = builder()
    at = b.mov(0, T.U32)
    src = b.cvta_global(b.ld_param("p"))
    b.cp_async(at, src, 16, dst_offset=1024)
    out = [b.reg(T.B32) for _ in range(4)]
    assert b.ldmatrix(at, 4, trans=True, offset=256, out=out) == tuple(out)
    text = b.text()
    assert f"cp.async.cg.shared.global [{at.name}+1024], [{src.name}], 16, 16;" in text
    assert f"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{', '.join(r.name for r in out)}}}, [{at.name}+256];" \
        in text
    with pytest.raises(PtxBuildError, match="2 destinations for 4 matrices"):
        b.ldmatrix(at, 4, out=out[:2])


def test_wgmma_checks_its_operands_and_drops_the_transpose_flags_for_tf32():
    b = builder()
    desc = b.mov(0, T.U64)
    scale = b.setp("ne", b.mov(1, T.U32), 0)
    acc = [b.mov(0.0, T.F32) for _ in range(32)]
    b.wgmma(acc, desc, desc, "bf16", 64, scale)
    b.wgmma(acc, desc, desc, "f16", 64, scale, mn_major=(True, False))
    b.wgmma(acc, desc, desc, "tf32", 64, scale)
    text = b.text()
    assert f"m64n64k16.f32.bf16.bf16 {{{acc[0].name}," in text and f"{scale.name}, 1, 1, 0, 0;" in text
    assert f"m64n64k16.f32.f16.f16 {{{acc[0].name}," in text and f"{scale.name}, 1, 1, 1, 0;" in text
    assert f"m64n64k8.f32.tf32.tf32 {{{acc[0].name}," in text and f"{scale.name}, 1, 1;" in text
    with pytest.raises(PtxBuildError, match="tf32 operands are K-major only"):
        b.wgmma(acc, desc, desc, "tf32", 64, scale, mn_major=(False, True))
    a = [b.mov(0, T.B32) for _ in range(4)]  # A from registers: no A transpose flag
    b.wgmma(acc, a, desc, "bf16", 64, scale, mn_major=(False, True))
    assert f"{{{', '.join(r.name for r in a)}}}, {desc.name}, {scale.name}, 1, 1, 1;" in b.text()
    with pytest.raises(PtxBuildError, match="4 A registers, got 32 and 3"):
        b.wgmma(acc, a[:3], desc, "bf16", 64, scale)
    with pytest.raises(PtxBuildError, match="32 accumulator registers, got 31"):
        b.wgmma(acc[:31], desc, desc, "bf16", 64, scale)
    with pytest.raises(PtxBuildError, match="not bf16, f16 or tf32"):
        b.wgmma(acc, desc, desc, "f32", 64, scale)

"""TMA tensor maps: the driver's description of a 2-D operand that a kernel's bulk tensor copies read.

A map is encoded on the host (``cuTensorMapEncodeTiled``) and handed to the kernel by the device
address of a 128-byte copy of it in global memory, so it is an ordinary pointer argument.
"""
from __future__ import annotations

import numpy as np
from cuda.bindings import driver as cu

from ptxgen.hw import SWIZZLE_ROW, MmaType

from .driver import call
from .memory import DeviceArray

_TYPES = {MmaType.BF16: cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
          MmaType.F16: cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
          # raw fp32 bits, as the cp.async feed copies them: the tensor cores read a truncated mantissa
          # (the TFLOAT32 type would round on the way instead)
          MmaType.TF32: cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT32}
_SWIZZLES = {128: cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B}  # by swizzled row bytes


def _encode(ptr: int, dtype: "cu.CUtensorMapDataType", dims: list[int], strides: list[int], box: list[int],
            l2: "cu.CUtensorMapL2promotion") -> DeviceArray:
    """A tiled map of the tensor at ``ptr``: ``dims`` innermost first, the byte ``strides`` of all
    but the innermost, ``box`` the elements one copy moves along each, in the kernels' 128-byte
    swizzle, zeros past the edges. The returned device array holds the map; free it after the
    launches that use it."""
    u64, u32 = cu.cuuint64_t, cu.cuuint32_t
    tensor_map = call("cuTensorMapEncodeTiled", dtype, u32(len(dims)), ptr, [u64(d) for d in dims],
                      [u64(s) for s in strides], [u32(x) for x in box], [u32(1)] * len(dims),
                      cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, _SWIZZLES[SWIZZLE_ROW], l2,
                      cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return DeviceArray.from_numpy(np.array(tensor_map.opaque, dtype=np.uint64).view(np.uint8))


_L2_128B = cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B
_L2_NONE = cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_NONE


def tiled_tensor_map(ptr: int, rows: int, cols: int, row_stride: int, dtype: MmaType,
                     box: tuple[int, int], halves: bool = False) -> DeviceArray:
    """A row-major [rows, cols] matrix of ``dtype`` at ``ptr`` (``row_stride`` elements apart), read
    in boxes of ``box`` = (rows, cols) into the kernels' swizzled shared tiles (``SWIZZLE_ROW``),
    zeros past the edges. ``halves``: its rows are two [rows / 2, cols] matrices (a 3-D map, the
    half its outermost coordinate), whose boxes stop at each half's last row.
    The returned device array holds the map; free it after the launches that use it."""
    if (row_stride * dtype.bytes) % 16 or ptr % 16:
        raise ValueError(f"a tensor map needs 16-byte aligned rows: stride {row_stride} x {dtype.bytes} bytes")
    if halves:
        if rows % 2:
            raise ValueError(f"a tensor map of two halves needs an even row count, got {rows}")
        return _encode(ptr, _TYPES[dtype], [cols, rows // 2, 2],
                       [row_stride * dtype.bytes, rows // 2 * row_stride * dtype.bytes], [box[1], box[0], 1], _L2_128B)
    return _encode(ptr, _TYPES[dtype], [cols, rows], [row_stride * dtype.bytes], [box[1], box[0]], _L2_128B)


def gemm_c_tensor_map(spec, c: int, m: int, n: int, ldc: int | None = None, splits: int = 1,
                      act: bool = False) -> DeviceArray:
    """The tensor map a ``tma_store`` GEMM spec stores C at ``c`` through: ``splits`` consecutive
    [m, ldc] matrices of its C type (f32 or bf16), written in boxes of [64 rows][128 bytes] from its
    128-byte swizzled staging; the copy unit leaves everything past n and m alone. A
    ``swiglu_grad`` spec's C (and its gate_up, read through a map of the same geometry) is two
    [m, n] halves side by side in rows of ldc (default 2 n): [dgate | dup] ([gate | up]); a
    ``swiglu_act`` spec's is two [m, n / 2] halves, [gate | up] (ldc default n), and ``act`` its
    act ([m, n / 2], rows of n / 2). A ``residual`` spec's R is read through a map of C's geometry too."""
    if not spec.tma_store:
        raise ValueError(f"{spec.kind}: C's tensor map is a tma_store spec's")
    size = spec.c_dtype.size
    if act and not spec.swiglu_act:
        raise ValueError(f"{spec.kind}: act's tensor map is a swiglu_act spec's")
    width = n // 2 if spec.swiglu_act else n  # the columns of a half (of the whole, with no halves)
    halves = spec.swiglu_grad or (spec.swiglu_act and not act)
    ldc = (width if act else 2 * width if halves else n) if ldc is None else ldc
    if ldc < width * (2 if halves else 1):
        raise ValueError(f"C's rows overlap: ldc {ldc} < n {width}{' x 2 (two halves)' if halves else ''}")
    if (ldc * size) % 16 or c % 16:
        raise ValueError(f"C's tensor map needs 16-byte aligned rows: ldc {ldc} x {size} bytes")
    if halves and (splits != 1 or (width * size) % 16):
        raise ValueError(f"a C of two halves is one product whose halves start 16-byte aligned: splits {splits}, "
                         f"half width {width}")
    dtype = (cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT32 if size == 4
             else cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16)
    third, stride = (2, width * size) if halves else (splits, m * ldc * size)  # the halves, or the splits
    return _encode(c, dtype, [width, m, third], [ldc * size, stride], [SWIZZLE_ROW // size, 64, 1], _L2_NONE)


def gemm_tensor_maps(spec, a: int, b: int, m: int, n: int, k: int, lda: int | None = None,
                     ldb: int | None = None) -> tuple[DeviceArray, DeviceArray]:
    """The tensor maps a TMA-fed GEMM spec (``gemm_wgmma`` with ``tma``) reads A at ``a`` and B at
    ``b`` through, for C[m, n] over a contraction of ``k`` (every split part's together); a
    ``swiglu_act`` spec's B is [gate; up], two [n / 2, k] halves, its boxes 64 rows of each."""
    (rows_a, cols_a, ld_a, box_a), (rows_b, cols_b, ld_b, box_b) = spec.tma_operands(m, n, k, lda, ldb)
    first = tiled_tensor_map(a, rows_a, cols_a, ld_a, spec.dtype, box_a)
    if spec.swiglu_act:
        return first, tiled_tensor_map(b, rows_b, cols_b, ld_b, spec.dtype, (64, box_b[1]), halves=True)
    return first, tiled_tensor_map(b, rows_b, cols_b, ld_b, spec.dtype, box_b)

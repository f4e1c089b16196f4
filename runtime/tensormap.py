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


def tiled_tensor_map(ptr: int, rows: int, cols: int, row_stride: int, dtype: MmaType,
                     box: tuple[int, int]) -> DeviceArray:
    """A row-major [rows, cols] matrix of ``dtype`` at ``ptr`` (``row_stride`` elements apart), read
    in boxes of ``box`` = (rows, cols) into the kernels' swizzled shared tiles (``SWIZZLE_ROW``),
    zeros past the edges.
    The returned device array holds the map; free it after the launches that use it."""
    if (row_stride * dtype.bytes) % 16 or ptr % 16:
        raise ValueError(f"a tensor map needs 16-byte aligned rows: stride {row_stride} x {dtype.bytes} bytes")
    u64, u32 = cu.cuuint64_t, cu.cuuint32_t
    tensor_map = call("cuTensorMapEncodeTiled", _TYPES[dtype], u32(2), ptr, [u64(cols), u64(rows)],
                      [u64(row_stride * dtype.bytes)], [u32(box[1]), u32(box[0])], [u32(1), u32(1)],
                      cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
                      _SWIZZLES[SWIZZLE_ROW],
                      cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                      cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return DeviceArray.from_numpy(np.array(tensor_map.opaque, dtype=np.uint64).view(np.uint8))


def gemm_c_tensor_map(spec, c: int, m: int, n: int, ldc: int | None = None, splits: int = 1) -> DeviceArray:
    """The tensor map a ``tma_store`` GEMM spec stores C at ``c`` through: ``splits`` consecutive
    [m, ldc] matrices of its C type (f32 or bf16), written in boxes of [64 rows][128 bytes] from its
    128-byte swizzled staging; the copy unit leaves everything past n and m alone. A
    ``swiglu_grad`` spec's C (and its gate_up, read through a map of the same geometry) is two
    [m, n] halves side by side in rows of ldc (default 2 n): [dgate | dup] ([gate | up])."""
    if not spec.tma_store:
        raise ValueError(f"{spec.kind}: C's tensor map is a tma_store spec's")
    size = spec.c_dtype.size
    ldc = (2 * n if spec.swiglu_grad else n) if ldc is None else ldc
    if ldc < n * (2 if spec.swiglu_grad else 1):
        raise ValueError(f"C's rows overlap: ldc {ldc} < n {n}{' x 2 (dgate | dup)' if spec.swiglu_grad else ''}")
    if spec.swiglu_grad and (splits != 1 or (n * size) % 16):
        raise ValueError(f"a swiglu_grad C is one product whose halves start 16-byte aligned: splits {splits}, n {n}")
    if (ldc * size) % 16 or c % 16:
        raise ValueError(f"C's tensor map needs 16-byte aligned rows: ldc {ldc} x {size} bytes")
    u64, u32 = cu.cuuint64_t, cu.cuuint32_t
    dtype = (cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT32 if size == 4
             else cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16)
    third, stride = (2, n * size) if spec.swiglu_grad else (splits, m * ldc * size)  # the halves, or the splits
    tensor_map = call("cuTensorMapEncodeTiled", dtype, u32(3), c, [u64(n), u64(m), u64(third)],
                      [u64(ldc * size), u64(stride)], [u32(SWIZZLE_ROW // size), u32(64), u32(1)],
                      [u32(1), u32(1), u32(1)], cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
                      _SWIZZLES[SWIZZLE_ROW], cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_NONE,
                      cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return DeviceArray.from_numpy(np.array(tensor_map.opaque, dtype=np.uint64).view(np.uint8))


def gemm_tensor_maps(spec, a: int, b: int, m: int, n: int, k: int, lda: int | None = None,
                     ldb: int | None = None) -> tuple[DeviceArray, DeviceArray]:
    """The tensor maps a TMA-fed GEMM spec (``gemm_wgmma`` with ``tma``) reads A at ``a`` and B at
    ``b`` through, for C[m, n] over a contraction of ``k`` (every split part's together)."""
    (rows_a, cols_a, ld_a, box_a), (rows_b, cols_b, ld_b, box_b) = spec.tma_operands(m, n, k, lda, ldb)
    first = tiled_tensor_map(a, rows_a, cols_a, ld_a, spec.dtype, box_a)
    return first, tiled_tensor_map(b, rows_b, cols_b, ld_b, spec.dtype, box_b)

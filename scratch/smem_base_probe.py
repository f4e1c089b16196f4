"""Where the dynamic shared memory starts in each block, with and without a cluster launch."""
import ctypes
import numpy as np
from cuda.bindings import driver as cu
from ptxgen.assemble import assemble
from runtime import DeviceArray
from runtime.driver import call, device, synchronize

device()
for cluster in (False, True):
    ptx = f""".version 8.0
.target sm_90a
.address_size 64
.extern .shared .align 1024 .b8 tiles[];
.visible .entry probe(.param .u64 out) {'.reqnctapercluster 2, 1, 1' if cluster else ''}
{{
 .reg .b32 %r<8>; .reg .b64 %rd<4>; .reg .pred %p<2>;
 ld.param.u64 %rd1, [out]; cvta.to.global.u64 %rd1, %rd1;
 mov.u32 %r1, %ctaid.x; mov.u32 %r2, {'%cluster_ctarank' if cluster else '%ctaid.x'}; mov.u32 %r3, tiles;
 mov.u32 %r4, %tid.x; setp.ne.u32 %p1, %r4, 0; @%p1 bra END;
 mul.wide.u32 %rd2, %r1, 8; add.u64 %rd2, %rd1, %rd2;
 st.global.v2.u32 [%rd2], {{%r2, %r3}};
END: ret;
}}
"""
    cubin = assemble(ptx, "sm_90a").cubin
    module = call("cuModuleLoadData", cubin)
    f = call("cuModuleGetFunction", module, b"probe")
    shared = 196704
    call("cuFuncSetAttribute", f, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
    out = DeviceArray.from_numpy(np.zeros((8, 2), np.uint32))
    arg = ctypes.c_uint64(out.ptr)
    params = (ctypes.c_void_p * 1)(ctypes.addressof(arg))
    call("cuLaunchKernel", f, 8, 1, 1, 128, 1, 1, shared, cu.CUstream(0), ctypes.addressof(params), 0)
    synchronize()
    print("cluster" if cluster else "plain", out.to_numpy().tolist())

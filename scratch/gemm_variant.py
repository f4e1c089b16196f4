"""bench_train with some of the model's GEMM specs replaced: GEMM_VARIANT='{"qkv.forward": {"block_n": 64}, ...}'
(module: qkv, o, gate_up, down, head; pass: forward, grad_input, grad_weight)."""
import dataclasses, json, os, sys
sys.path.insert(0, "bench")
import model.kernels as mk

variant = json.loads(os.environ.get("GEMM_VARIANT", "{}"))
orig = mk.ModelKernels.of.__func__


def of(cls, *a, **k):
    kern = orig(cls, *a, **k)
    changes = {}
    for key, fields in variant.items():
        module, gemm = key.split(".")
        lin = changes.get(module, getattr(kern, module))
        changes[module] = dataclasses.replace(lin, **{gemm: dataclasses.replace(getattr(lin, gemm), **fields)})
    return dataclasses.replace(kern, **changes)


mk.ModelKernels.of = classmethod(of)
import bench_train  # noqa: E402
sys.exit(bench_train.main(sys.argv[1:]))

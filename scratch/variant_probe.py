"""bench_compute's model-gemms rows for one layer, its specs changed: variants of one GEMM side by side.
python3 scratch/variant_probe.py LAYER WHAT '{"name": {fields}, ...}'   (LAYER qkv|o_proj|gate_up|down|lm_head,
WHAT forward|grad_input|grad_weight)"""
import dataclasses
import json
import sys

sys.path.insert(0, "bench")
import bench_compute as bc  # noqa: E402
import model.kernels as mk  # noqa: E402
from runtime import ModuleCache  # noqa: E402

layer, what, variants = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
attr = {"qkv": "qkv", "o_proj": "o", "gate_up": "gate_up", "down": "down", "lm_head": "head"}[layer]
bc.LAYERS = [x for x in bc.LAYERS if x[0].split()[0] == layer]
orig = mk.ModelKernels.of.__func__
cache = ModuleCache()
for name, fields in list(variants.items()) * 2:
    def of(cls, *a, _f=fields, **kw):
        k = orig(cls, *a, **kw)
        lin = getattr(k, attr)
        lin = dataclasses.replace(lin, **{what: dataclasses.replace(getattr(lin, what), **_f)})
        return dataclasses.replace(k, **{attr: lin})
    mk.ModelKernels.of = classmethod(of)
    rows = []
    print(f"--- {name}: {fields}", flush=True)
    bc.model_gemms(cache, rows)

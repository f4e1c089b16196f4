"""bench_train with PDL variants (PDL_MODE): edges = programmatic edges, wait then trigger (the tree's);
noedges = the kernels' griddepcontrol but default edges; plain = neither; waitonly = edges, kernels wait but
never trigger (their dependents launch as their blocks exit). Use a PTXGEN_CACHE_DIR per mode."""
import os, sys
sys.path.insert(0, "bench")
import runtime.graph as g
import ptxgen.builder as pb
mode = os.environ["PDL_MODE"]
if mode in ("noedges", "plain"):
    real = g._edge
    g._edge = lambda programmatic: real(False)
if mode == "plain":
    pb.KernelBuilder.grid_dependency_wait = lambda self: None
if mode == "waitonly":
    pb.KernelBuilder.grid_dependency_wait = lambda self: self._emit("griddepcontrol.wait")
import bench_train  # noqa: E402
sys.exit(bench_train.main(sys.argv[1:]))

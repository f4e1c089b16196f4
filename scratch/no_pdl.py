"""bench_train with the graphs' edges all default (no programmatic dependencies): the A/B for PDL."""
import sys
sys.path.insert(0, "bench")
import runtime.graph as g
real = g._edge
g._edge = lambda programmatic: real(False)
import bench_train  # noqa: E402
sys.exit(bench_train.main(sys.argv[1:]))

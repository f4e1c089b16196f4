"""The CUDA model's launch plan on the GPU: a training step replayed as one CUDA graph gives the
launched step's results bit for bit, and every step of the plan writes only what it says it writes."""
import numpy as np
import pytest

from model.config import preset
from model.optim import AdamWSettings
from model.params import init_params
from model.precision import Precision
from runtime import DeviceArray, ModuleCache
from runtime.driver import synchronize

pytestmark = pytest.mark.cuda
CONFIGS = {"tiny": preset("tiny"), "qwen2-shaped-2-layer": preset("qwen2-0.5b").replace(num_layers=2)}
SHAPES = {"tiny": [(2, 16), (1, 32)], "qwen2-shaped-2-layer": [(1, 128), (2, 64)]}  # taken in turn


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def twenty_steps(cache, name: str, precision: Precision, graph: bool = True,
                 loss_chunk_rows: int = 1 << 20) -> tuple[list, dict[str, np.ndarray]]:
    """Losses, norms and the final weights and moments of 20 steps on batches of two shapes in
    turn (two plans, two graphs), each batch with other tokens (the embedding backward's grid
    changes) and each step with another learning rate."""
    from model.cuda_model import CudaBackend
    config = CONFIGS[name]
    model = CudaBackend(config, init_params(config, seed=0), AdamWSettings(), cache=cache, precision=precision,
                        graph=graph, loss_chunk_rows=loss_chunk_rows)
    rng = np.random.default_rng(1)
    try:
        out = []
        for step in range(20):
            b, s = SHAPES[name][step % 2]
            ids = rng.integers(0, min(config.vocab_size, 50 + 40 * step), (b, s))
            targets = np.roll(ids, -1, axis=1)
            targets[:, -1] = -100
            out.append(model.train_step(ids, targets, lr=1e-3 * (1 + step % 3)))
        state = {"weights": model.weights.to_numpy(), "exp_avg": model.exp_avg.to_numpy(),
                 "exp_avg_sq": model.exp_avg_sq.to_numpy()}
        if model.weights16 is not None:
            state["weights16"] = model.weights16.to_numpy()
        return out, state
    finally:
        model.close()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
@pytest.mark.parametrize("name", CONFIGS)
def test_graph_replayed_steps_equal_launched_steps_bit_for_bit(cache, name, precision):
    assert_same_bits(*(twenty_steps(cache, name, precision, graph) for graph in (False, True)))


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
@pytest.mark.parametrize("name", CONFIGS)
def test_the_loss_in_chunks_of_logits_equals_the_loss_at_once_bit_for_bit(cache, name, precision):
    """The logits made 7 rows at a time (chunks that do not divide the batch) give every loss,
    norm, weight and moment of the logits made all at once."""
    assert_same_bits(twenty_steps(cache, name, precision), twenty_steps(cache, name, precision, loss_chunk_rows=7))


def test_every_rows_logits_come_back_when_the_loss_takes_them_in_chunks(cache):
    from model.cuda_model import CudaBackend
    config = CONFIGS["tiny"]
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, 20))
    logits = []
    for chunk in (1 << 20, 7):
        model = CudaBackend(config, init_params(config, seed=0), AdamWSettings(), cache=cache, loss_chunk_rows=chunk)
        try:
            logits.append(model.logits(ids))
        finally:
            model.close()
    assert logits[0].shape == (3, 20, config.vocab_size)
    assert logits[0].tobytes() == logits[1].tobytes()


def assert_same_bits(a, b) -> None:
    assert np.array_equal(np.array(a[0]), np.array(b[0]))  # losses and grad norms, all 20
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert a[1][key].tobytes() == b[1][key].tobytes(), key


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_every_step_writes_only_its_declared_outputs(cache, precision):
    """Run a tiny training step's plan step by step; after each, every byte of every buffer the
    backend holds is unchanged outside the regions the step declares it writes."""
    from model.cuda_model import CudaBackend
    config = CONFIGS["tiny"]
    model = CudaBackend(config, init_params(config, seed=0), AdamWSettings(), cache=cache, precision=precision)
    try:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.vocab_size, (2, 16))
        model.train_step(ids, np.roll(ids, -1, axis=1), lr=1e-3)  # sets every per-step value
        plan = model.plan(2, 16)
        shape = model._shapes[(2, 16)]
        arrays = [*shape.arena._arrays, model.weights, model.grads, model.exp_avg, model.exp_avg_sq,
                  model.norm_partial, model.norm_out] + ([model.weights16] if model.weights16 is not None else [])
        values = plan._values
        for step in plan:
            before = [a.to_numpy().view(np.uint8).copy() for a in arrays]
            step()
            synchronize()
            written = step.extents(values)
            for array, old in zip(arrays, before):
                changed = np.flatnonzero(array.to_numpy().view(np.uint8).reshape(-1) != old.reshape(-1))
                addresses = array.ptr + changed
                inside = np.zeros(len(changed), bool)
                for start, size in written:
                    inside |= (addresses >= start) & (addresses < start + size)
                assert inside.all(), (f"{step.label} ({step.kind}) wrote {int((~inside).sum())} bytes outside its "
                                      f"declared outputs {step.writes()}")
    finally:
        model.close()


def test_plan_values_reach_the_graph_each_run(cache):
    """A graph node follows its step's named value: a one-kernel plan replayed with another
    scale writes the new result."""
    from ptxgen.kernels.cross_entropy import CrossEntropySpec
    from runtime.plan import Plan
    spec = CrossEntropySpec(vocab=64, ignore_index=-100)
    plan = Plan(cache)
    rng = np.random.default_rng(0)
    logits = DeviceArray.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    targets = DeviceArray.from_numpy(np.array([1, 2, 3, 4], np.int32))
    loss, dlogits = DeviceArray(4), DeviceArray((4, 64))
    scale = plan.value("scale", 1.0)
    plan.add(spec, spec.launch_dims(4), label="ce", logits=logits, targets=targets, loss=loss, dlogits=dlogits,
             grad_scale=scale)
    try:
        results = []
        for s in (1.0, 0.5, 0.25):
            plan.set(scale=s)
            plan.run(graph=True)
            results.append(dlogits.to_numpy())
        np.testing.assert_array_equal(results[1], results[0] * 0.5)
        np.testing.assert_array_equal(results[2], results[0] * 0.25)
    finally:
        plan.free()
        for a in (logits, targets, loss, dlogits):
            a.free()

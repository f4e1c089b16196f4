"""Launch plans, built without a GPU (``dry_device``): arguments are checked by name when the plan
is built, per-run values reach every launch that reads them, each step says what it reads and
writes, and the CUDA model's whole plan is built, named and complete for every preset shape."""
import dataclasses

import numpy as np
import pytest

from dry_device import DryCache, dry_device
from model.config import preset
from model.optim import AdamWSettings
from model.params import param_shapes
from model.precision import Precision
from ptxgen.builder import T
from ptxgen.kernels.adamw import AdamWSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.registry import get_kind, kinds
from runtime.memory import View
from runtime.plan import Expr, Plan, dependencies, offset

QWEN_SHAPED = dataclasses.replace(preset("qwen2-0.5b"), num_layers=2)


def view(name: str, ptr: int = 1 << 20, size: int = 1024, dtype: str = "f32") -> View:
    return View(name, ptr, (size,), dtype)


@pytest.fixture
def plan(monkeypatch):
    with dry_device(monkeypatch):
        yield Plan(DryCache())


def test_every_kernel_names_its_outputs_among_its_pointers():
    for kind in kinds():
        for spec in get_kind(kind).examples():
            pointers = {name for name, t in spec.params() if t is T.U64}
            assert spec.outputs() and set(spec.outputs()) <= pointers, (kind, spec.outputs())


def test_expressions_add_and_scale_named_values():
    rows = Expr(terms=(("cached", 1),))
    at = Expr(base=view("k", ptr=4096)) + rows * 256
    assert at.evaluate({"cached": 3}) == 4096 + 768
    assert (rows + 5).evaluate({"cached": 2}) == 7
    assert str(at) == "k + 256*cached"
    with pytest.raises(TypeError):
        at * 2  # an address cannot be scaled
    with pytest.raises(TypeError):
        at + Expr(base=view("v"))


def test_arguments_are_checked_by_name_when_the_plan_is_built(plan):
    src, dst = view("src"), view("dst", ptr=1 << 21, dtype="bf16")
    spec = CastSpec()
    with pytest.raises(TypeError, match="missing argument n"):
        plan.add(spec, spec.launch_dims(16), label="cast", src=src, dst=dst)
    with pytest.raises(TypeError, match="unknown argument count"):
        plan.add(spec, spec.launch_dims(16), label="cast", src=src, dst=dst, n=16, count=16)
    with pytest.raises(TypeError, match="n is .u32, got float"):
        plan.add(spec, spec.launch_dims(16), label="cast", src=src, dst=dst, n=16.0)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        plan.add(spec, spec.launch_dims(16), label="cast", src=view("odd", ptr=(1 << 20) + 4), dst=dst, n=16)
    with pytest.raises(ValueError, match="never declared"):
        plan.add(spec, spec.launch_dims(16), label="cast", src=src, dst=dst, n=Expr(terms=(("count", 1),)))
    assert len(plan) == 0


def test_a_value_reaches_every_launch_that_reads_it_and_must_be_set_before_a_run(plan):
    spec = AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    lr = plan.value("lr", 0.0)
    bufs = {n: view(n, ptr=(i + 1) << 20) for i, n in enumerate(("param", "grad", "exp_avg", "exp_avg_sq"))}
    steps = [plan.add(spec, spec.launch_dims(1024), label=f"adamw {i}", **bufs, clip=view("clip", ptr=1 << 24),
                      n=1024, lr=lr * (i + 1), bias_correction1=1.0, bias_correction2=1.0) for i in range(2)]
    with pytest.raises(RuntimeError, match="lr must be set"):
        plan.run()
    plan.set(lr=0.5)
    assert [s.launch._values[6].value for s in steps] == [0.5, 1.0]
    with pytest.raises(ValueError, match="no plan value lr2"):
        plan.set(lr2=1.0)
    with pytest.raises(ValueError, match="declared twice"):
        plan.value("lr", 1.0)
    assert steps[0].writes() == {"param": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    # AdamW updates its weights and moments in place: it reads them too
    assert steps[0].reads() == {"param": "param", "grad": "grad", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
                                "clip": "clip"}


def test_a_grid_can_follow_a_value(plan):
    spec = CastSpec()
    blocks = plan.value("blocks", 1)
    step = plan.add(spec, ((blocks,), 256), label="cast", src=view("src"), dst=view("dst", 1 << 21, dtype="bf16"),
                    n=16)
    plan.set(blocks=7)
    assert step.grid == (7, 1, 1)


def test_a_value_a_host_step_sets_need_not_be_given_for_the_launches_after_it(plan):
    """The host step runs before them (while the GPU runs the launches before it) and sets the
    value; a launch before it still needs the value given, and a host step sets only declared ones."""
    spec, src, dst = CastSpec(), view("src"), view("dst", 1 << 21, dtype="bf16")
    blocks = plan.value("blocks", 1)
    plan.add(spec, spec.launch_dims(16), label="cast 1", src=src, dst=dst, n=16)
    plan.host(lambda: plan.set(blocks=3), label="count", writes=[src], sets=["blocks"])
    last = plan.add(spec, ((blocks,), 256), label="cast 2", src=src, dst=dst, n=16)
    plan.run()
    assert last.grid == (3, 1, 1)
    with pytest.raises(ValueError, match="plan values unknown were never declared"):
        plan.host(lambda: None, label="bad", sets=["unknown"])
    other = Plan(plan.cache)
    count = other.value("count", 1)
    other.add(spec, ((count,), 256), label="first", src=src, dst=dst, n=16)
    other.host(lambda: other.set(count=2), label="too late", sets=["count"])
    with pytest.raises(RuntimeError, match="count must be set"):
        other.run()


def test_setting_a_value_updates_only_its_readers_also_those_added_since_and_only_if_it_changes(plan, monkeypatch):
    spec, src, dst = CastSpec(), view("src"), view("dst", 1 << 21, dtype="bf16")
    a, b = plan.value("a", 1), plan.value("b", 1)
    first = plan.add(spec, ((a,), 256), label="reads a", src=src, dst=dst, n=16)
    plan.set(a=2)
    second = plan.add(spec, ((a + b,), 256), label="reads a and b", src=src, dst=dst, n=16)
    plan.set(a=4, b=5)
    assert (first.grid, second.grid) == ((4, 1, 1), (9, 1, 1))
    plan.set(b=1)
    assert (first.grid, second.grid) == ((4, 1, 1), (5, 1, 1))
    touched = []
    monkeypatch.setattr("runtime.plan.Graph", lambda steps, dependencies: type("G", (), {"touch": lambda _, s: touched.append(s)})())
    plan.graph()  # (capturing one needs a GPU)
    plan.set(a=4, b=1)  # as they are: no graph node to update
    plan.set(a=4, b=2)
    assert touched == [second] and second.grid == (6, 1, 1)


def _backend(config, precision):
    from model.cuda_model import CudaBackend
    params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
    return CudaBackend(config, params, AdamWSettings(), cache=DryCache(), precision=precision)


@pytest.mark.parametrize("alone", [True, False])
def test_gemms_cut_their_tails_only_with_the_gpu_to_themselves(monkeypatch, alone):
    """bf16 at 8 x 1024 (QWEN_SHAPED, 132 SMs of one block each): alone on the GPU (a backend's
    own step) the GEMMs whose last wave is thin cut their tails along K through the backend's one
    workspace, and no weight gradient is split (no parts sum); beside another stream's kernels
    (a data-parallel rank: ``gemms_alone`` False) none cuts its tail, the dW GEMMs split as before."""
    from model.cuda_model import CudaBackend
    monkeypatch.setattr(CudaBackend, "gemms_alone", alone)
    with dry_device(monkeypatch):
        model = _backend(QWEN_SHAPED, Precision.BF16)
        plan = model.plan(8, 1024)
        gemms = [s for s in plan if s.kind == "gemm_wgmma"]
        cut = [s for s in gemms if s.args.get("tail_parts", 1) > 1]
        parts_sums = [s for s in plan if s.kind == "parts_sum"]
        if alone:
            assert {s.label.split()[1].split(".")[-1] + " " + s.label.split()[2] for s in cut} >= {
                "gate_up_proj dX", "gate_up_proj dW", "down_proj forward", "down_proj dW", "embed_tokens dX"}
            assert {s.args["partials"].name for s in cut} == {"tail partial sums"} and not parts_sums
        else:
            assert not any(s.spec.split_tail for s in gemms) and parts_sums
        model.close()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_q_k_v_and_gate_up_run_as_one_gemm_each_way(monkeypatch, precision):
    """Per layer four GEMMs forward (q/k/v, o, gate/up, down) and eight backward (dW and dX of each),
    plus the LM head's: the fused modules' parts never get a GEMM of their own."""
    config = preset("tiny")
    with dry_device(monkeypatch):
        model = _backend(config, precision)
        plan = model.plan(2, 64)
        gemms = {section: [s for s in plan.of(section) if s.kind.startswith("gemm")]
                 for section in ("forward", "backward")}
        assert len(gemms["forward"]) == 4 * config.num_layers + 1  # 128 rows: one loss chunk
        assert len(gemms["backward"]) == 8 * config.num_layers + 2
        labels = " ".join(s.label for s in plan)
        assert "qkv_proj" in labels and not any(f".{n}.weight" in labels for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "gate_proj", "up_proj"))
        model.close()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
@pytest.mark.parametrize("config", [preset("tiny"), QWEN_SHAPED], ids=["tiny", "qwen2-shaped-2-layer"])
def test_the_models_plan_writes_every_gradient_in_its_backward(monkeypatch, config, precision):
    """Built by name without a GPU: every kernel pre-warmed (strict mode), every parameter's
    gradient written by a step of the backward (what a gradient-communication hook waits for),
    every AdamW step after the last of them, per-step values named."""
    with dry_device(monkeypatch):
        model = _backend(config, precision)
        plan = model.plan(2, 64)
        sections = [s.section for s in plan]
        assert sections == sorted(sections, key=["forward", "backward", "optimizer"].index)
        # by address, every byte (gate and up are written as one fused gradient)
        extents = sorted(e for s in plan.of("backward") for e in s.extents(plan._values))
        for name in param_shapes(config):
            grad = model.params_view[name].grad
            start, end = grad.ptr, grad.ptr + grad.nbytes
            for at, n in extents:
                if at <= start < at + n:
                    start = at + n
            assert start >= end, f"{name}: bytes from {start - grad.ptr} on are written by no backward step"
        assert set(plan._values) == {"loss_scale", "segments", "lr", "bias_correction1", "bias_correction2"}
        assert all(line for line in plan.describe())
        model.close()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
@pytest.mark.parametrize("config, shapes", [
    (preset("tiny"), [(2, 64)]), (QWEN_SHAPED, [(2, 64)]),
    (preset("tiny"), [(8, 1024), (3, 1024)]),  # the LM head's dW split; a partial validation batch
    (preset("tiny").replace(qkv_bias=False, tie_word_embeddings=True), [(16, 512)])],
    ids=["tiny", "qwen2-shaped-2-layer", "tiny-split-head-two-shapes", "llama-style-tied"])
def test_the_memory_estimate_counts_what_the_training_step_allocates(monkeypatch, config, shapes, precision):
    """footprint.train_bytes, asked before any allocation, counts each shape's step buffers from
    the same function the backend allocates them with (step_buffers) and the backward's scratch
    from the same shapes (scratch_shapes, split-K at the largest split of any GPU wave): the step
    allocates those buffers and at most that scratch, the split tails' workspace and the tensor
    maps besides, and the estimate covers everything allocated."""
    from model.footprint import (SMALL_BUFFERS, cuda_scratch_bytes, cuda_step_buffer_bytes, tail_workspace_bytes,
                                 train_bytes)
    bf16 = precision is Precision.BF16
    with dry_device(monkeypatch) as allocations:
        model = _backend(config, precision)
        held = sum(n for _, n in allocations)
        for batch, seq in shapes:
            model.plan(batch, seq)
        step = sum(n for _, n in allocations) - held
        model.close()
    buffers = sum(cuda_step_buffer_bytes(config, b, s, bf16) for b, s in shapes)
    # and the backward's scratch, the split tails' workspace, tensor maps (within SMALL_BUFFERS)
    scratch = sum(cuda_scratch_bytes(config, b * s, bf16) for b, s in shapes)
    tail = tail_workspace_bytes(config, bf16, {b * s for b, s in shapes})
    assert buffers <= step <= buffers + scratch + tail + SMALL_BUFFERS
    assert held + step <= train_bytes(config, shapes, on_gpu=True, bf16=bf16) <= 1.35 * (held + step)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_the_memory_estimate_counts_what_decoding_allocates(monkeypatch, precision):
    """A prompt's plan and one token's, KV caches of max_len, the backend: all within the estimate."""
    from model.footprint import generate_bytes
    config = QWEN_SHAPED
    with dry_device(monkeypatch) as allocations:
        model = _backend(config, precision)
        decoder = model.decoder(300)
        decoder._plan(300), decoder._plan(1)
        used = sum(n for _, n in allocations)
        decoder.close()
        model.close()
    assert used <= generate_bytes(config, 300, on_gpu=True, bf16=precision is Precision.BF16) <= 1.35 * used


def test_the_decoders_plan_writes_new_keys_where_the_cache_ends(monkeypatch):
    with dry_device(monkeypatch):
        model = _backend(preset("tiny"), Precision.BF16)
        decoder = model.decoder(32)
        plan = decoder._plan(3).plan
        plan.set(cached=5)
        row_bytes = 2 * preset("tiny").num_kv_heads * preset("tiny").head_dim  # bf16 keys and values
        kv = decoder._kv[0]
        # layer 0's new keys (RoPE's output) and values (copied out of the fused projection's rows)
        rope_k = [s for s in plan if s.kind == "rope"][1]
        v_copy = next(s for s in plan if s.kind == "cast")
        assert rope_k.launch._values[1].value == kv.k.ptr + 5 * row_bytes
        assert v_copy.launch._values[1].value == kv.v.ptr + 5 * row_bytes
        attention = next(s for s in plan if s.kind.startswith("attention"))
        assert (attention.args["k"], attention.args["kv_len"].evaluate(plan._values)) == (kv.k, 8)
        decoder.close()
        model.close()


def test_a_tied_and_an_untied_head_plan_their_embedding_gradient(monkeypatch):
    """Untied: the table's gradient is zeroed, then the embedding backward writes it; tied: the
    LM head's gradient is there first and the embedding backward adds to it (no fill)."""
    with dry_device(monkeypatch):
        for tied in (True, False):
            config = dataclasses.replace(preset("tiny"), tie_word_embeddings=tied)
            model = _backend(config, Precision.FP32)
            kinds_ = [s.kind for s in model.plan(1, 8).of("backward")]
            assert ("fill" in kinds_) is not tied
            assert kinds_[-1] == "embedding_bwd"
            model.close()


def test_the_batch_is_grouped_by_token_on_the_host_while_the_gpu_runs_the_forward(monkeypatch):
    """The training step's one host step opens its backward (a graph run launches the forward's
    graph first, so the host groups the rows while the GPU runs it); it writes the embedding
    backward's grouping and sets its segment count, which no launch before it reads."""
    from runtime.plan import Host
    with dry_device(monkeypatch):
        model = _backend(preset("tiny"), Precision.BF16)
        plan = model.plan(2, 16)
        hosts = [s for s in plan.of() if isinstance(s, Host)]
        assert len(hosts) == 1 and plan.of("backward")[0] is hosts[0] and hosts[0].sets == {"segments"}
        bufs = model._shape(2, 16).bufs
        assert set(hosts[0].writes().values()) == {bufs.order.name, bufs.seg_start.name, bufs.seg_id.name}
        assert all("segments" not in s.values for s in plan.of("forward"))
        assert [s.kind for s in plan.of("backward") if "segments" in s.values] == ["embedding_bwd"]
        model.close()



@pytest.mark.parametrize("chunk", [24, 7])
def test_the_loss_takes_the_logits_a_chunk_of_rows_at_a_time(monkeypatch, chunk):
    """At 2 x 64 tokens and 24-row chunks: six LM head GEMMs and cross-entropies (24, 24, 24, 24,
    24, 8 rows) through one 24-row logits buffer, each writing its own rows of the gradient. At
    7-row chunks the targets and losses of a chunk start 28 bytes apart: the cross-entropy reads
    them one int32 / f32 at a time, so they need (and are checked for) 4-byte alignment only."""
    from model.cuda_model import CudaBackend
    config = preset("tiny")
    with dry_device(monkeypatch):
        params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
        model = CudaBackend(config, params, AdamWSettings(), cache=DryCache(), loss_chunk_rows=chunk)
        plan = model.plan(2, 64)
        ce = [s for s in plan if s.kind == "cross_entropy"]
        starts = range(0, 128, chunk)
        assert [s.grid[0] for s in ce] == [min(chunk, 128 - start) for start in starts]
        bufs = model._shapes[(2, 64)].bufs
        row = config.vocab_size * 4
        assert [s.launch._values[3].value for s in ce] == [bufs.dlogits.ptr + start * row for start in starts]
        assert [s.launch._values[1].value for s in ce] == [bufs.targets.ptr + 4 * start for start in starts]
        assert bufs.logits.shape == (chunk, config.vocab_size)
        model.close()


def test_the_last_writer_of_each_gradient_is_where_a_communication_hook_may_send_it(monkeypatch):
    """The final norm's gradient is final early in the backward, layer 0's input norm late, the
    tied embedding's at the very end (the embedding backward adds to the LM head's part)."""
    with dry_device(monkeypatch):
        model = _backend(preset("tiny"), Precision.BF16)
        plan = model.plan(2, 16)
        backward = plan.of("backward")
        W = model.params_view

        def last(name: str) -> int:
            grad = W[name].grad
            return plan.last_writer(grad.ptr, grad.nbytes, "backward")

        assert last("model.norm.weight") < last("model.layers.1.input_layernorm.weight") < \
            last("model.layers.0.input_layernorm.weight") < last("model.embed_tokens.weight") == len(backward) - 1
        assert backward[last("model.norm.weight")].kind == "colsum"
        assert plan.last_writer(model.exp_avg.ptr, model.exp_avg.nbytes, "backward") is None
        model.close()


def test_the_readers_of_a_buffer_include_the_steps_that_update_it_in_place(monkeypatch):
    """The tied embedding table's gradient: the LM head's dW writes it, the embedding backward adds
    to it (reads it, ``read_outputs``) and the optimizer's AdamW reads it (an input); the moments
    only AdamW reads, and updates in place."""
    with dry_device(monkeypatch):
        model = _backend(dataclasses.replace(preset("tiny"), tie_word_embeddings=True), Precision.FP32)
        plan = model.plan(2, 16)
        grad = model.params_view["model.embed_tokens.weight"].grad
        assert [s.kind for s in plan.readers(grad.ptr, grad.nbytes, "backward")] == ["embedding_bwd"]
        assert {s.kind for s in plan.readers(grad.ptr, grad.nbytes, "optimizer")} >= {"adamw"}
        moments = plan.readers(model.exp_avg.ptr, model.exp_avg.nbytes, "forward", "backward", "optimizer")
        assert moments and {s.kind for s in moments} == {"adamw"}
        model.close()


def test_host_steps_run_in_plan_order_and_split_a_graph_run_into_segments(plan):
    """A collective between launches: the launches before it, it, the launches after, in order;
    its writes are seen by last_writer (a later bucket's hook waits for it) and by a reader."""
    from runtime.plan import Host, _segments
    spec, calls = CastSpec(), []
    src, dst = view("src"), view("dst", 1 << 21, dtype="bf16")
    first = plan.add(spec, spec.launch_dims(16), label="cast 1", src=src, dst=dst, n=16)
    hook = plan.host(lambda: calls.append("host"), label="all-reduce src", reads=[src], writes=[src])
    last = plan.add(spec, spec.launch_dims(16), label="cast 2", src=src, dst=dst, n=16)
    assert isinstance(hook, Host) and hook.writes() == {"out0": "src"} and hook.reads() == {"in0": "src"}
    assert plan.last_writer(src.ptr, src.nbytes) == 1 and "host: writes src" in hook.describe()
    assert _segments(plan.of()) == [[first], hook, [last]]
    assert _segments([hook, hook]) == [hook, hook] and _segments([]) == []
    plan.run()  # launch by launch (the dry device's launches do nothing)
    assert calls == ["host"]
    with pytest.raises(ValueError, match="segment 1 of the plan is a host step"):
        plan.graph(segment=1)
    with pytest.raises(ValueError, match="has host steps: name the segment"):
        plan.graph()


def test_a_host_step_inserted_after_a_launch_runs_right_after_it_in_its_section(plan, monkeypatch):
    """insert_host: after the named step and after host steps already placed there (several
    placed after one step keep the order placed); refused once graphs are built."""
    from runtime.plan import Host
    spec, calls = CastSpec(), []
    src, dst = view("src"), view("dst", 1 << 21, dtype="bf16")
    plan.section = "backward"
    first = plan.add(spec, spec.launch_dims(16), label="cast 1", src=src, dst=dst, n=16)
    last = plan.add(spec, spec.launch_dims(16), label="cast 2", src=src, dst=dst, n=16)
    plan.section = "optimizer"
    a = plan.insert_host(first, lambda: calls.append("a"), label="send a", reads=[src])
    b = plan.insert_host(first, lambda: calls.append("b"), label="send b", reads=[src])
    assert plan.of() == [first, a, b, last] and a.section == b.section == "backward"
    plan.run()
    assert calls == ["a", "b"]
    monkeypatch.setattr("runtime.plan.Graph", lambda steps, dependencies: object())  # (capturing one needs a GPU)
    captured = plan.graph("backward", segment=0)
    assert plan.graph("backward", segment=0) is captured  # captured once
    with pytest.raises(RuntimeError, match="inserted after the plan's graphs were built"):
        plan.insert_host(last, lambda: None, label="late")
    assert all(isinstance(s, Host) for s in (a, b))


def test_a_plans_graph_is_captured_once_whether_or_not_its_segment_is_named(plan, monkeypatch):
    spec = CastSpec()
    src, dst = view("src"), view("dst", 1 << 21, dtype="bf16")
    plan.add(spec, spec.launch_dims(16), label="cast", src=src, dst=dst, n=16)
    monkeypatch.setattr("runtime.plan.Graph", lambda steps, dependencies: object())  # (capturing one needs a GPU)
    whole = plan.graph()
    assert plan.graph() is whole is plan.graph(segment=0)


def _cast(plan: Plan, label: str, src, dst):
    spec = CastSpec()
    return plan.add(spec, spec.launch_dims(16), label=label, src=src, dst=dst, n=16)


def test_a_graphs_steps_follow_only_the_steps_whose_memory_they_touch(plan):
    """A step runs after the last to write what it reads or writes, and after those that read what
    it writes since; steps on memory of their own depend on nothing (a graph may run them at once);
    no dependency is listed that another already implies."""
    a, b, c, d = (view(x, ptr=(1 + i) << 20) for i, x in enumerate("abcd"))
    _cast(plan, "a -> b", a, b)  # 0
    _cast(plan, "c -> d", c, d)  # 1: nothing in common with 0
    _cast(plan, "b -> c", b, c)  # 2: reads what 0 wrote, writes what 1 read and wrote
    _cast(plan, "a -> b again", a, b)  # 3: writes what 2 read (2 follows 0 already)
    _cast(plan, "d -> a", d, a)  # 4: reads 1's, writes what 0 and 3 read
    assert dependencies(plan.of()) == [[], [], [0, 1], [2], [3]]


def test_an_address_made_from_values_counts_as_its_whole_buffer_and_a_bare_one_as_all_memory(plan):
    """The dependencies hold at any values: an argument at an offset set per run reaches its whole
    buffer, one that names no buffer reaches everything."""
    a, b, c, d = (view(x, ptr=(1 + i) << 20) for i, x in enumerate("abcd"))
    at = plan.value("row", 0)
    _cast(plan, "a -> b[row:]", a, offset(b, at * 64))  # 0
    _cast(plan, "b[0:] -> c", view("b's start", ptr=b.ptr, size=16), c)  # 1: b's start, whatever row is
    _cast(plan, "d -> somewhere", d, 5 << 20)  # 2: a bare address: anywhere
    assert dependencies(plan.of()) == [[], [0], [1]]


def test_launches_whose_blocks_wait_for_each_other_never_run_at_once():
    """Two split-tail GEMMs on memory of their own still run one after the other: each could hold
    the SMs the other's awaited blocks need."""
    class Launch:
        def __init__(self, at: int, waits: bool):
            self.at, self.spec = at, type("S", (), {"blocks_wait": lambda _: waits})()

        def spans(self, reads: bool = False):
            return [(self.at + reads, 1)]
    steps = [Launch(0, True), Launch(8, False), Launch(16, True), Launch(24, True)]
    assert dependencies(steps) == [[], [], [0], [2]]


def test_every_pair_of_the_models_steps_on_the_same_memory_is_ordered(monkeypatch):
    """In the whole training step's graphs, of every two steps where one writes what the other
    reads or writes, the earlier runs before the later (directly or through others)."""
    from runtime.plan import _overlap, _segments
    with dry_device(monkeypatch):
        model = _backend(QWEN_SHAPED, Precision.BF16)
        plan = model.plan(2, 64)
        for part in (s for s in _segments(plan.of()) if isinstance(s, list)):
            deps, before = dependencies(part), []
            for j, kept in enumerate(deps):
                before.append(set(kept).union(*(before[i] for i in kept)))
                w, r = part[j].spans(), part[j].spans(reads=True)
                for i in range(j):
                    if _overlap(part[i].spans(), r + w) or _overlap(part[i].spans(reads=True), w):
                        assert i in before[j], (part[i].label, part[j].label)
            beside_the_next = {part[j - 1].kind for j in range(1, len(part)) if j - 1 not in before[j]}
            if part[0].section == "backward":  # e.g. the bias's column sum beside the GEMMs after it
                assert {"colsum", "gemm_wgmma"} <= beside_the_next, beside_the_next
        model.close()

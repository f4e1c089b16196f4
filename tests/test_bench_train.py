"""bench_train.py's pure parts (bench/train_report.py): the FLOPs and MFU formula, the runs its command
line asks for, bad input, the table that shows the bar, and the JSON. No torch, no GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import PRESETS

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tr = _load("train_report")
H200 = tr.RATED_TFLOPS["NVIDIA H200"]
GiB = 2**30


def test_matmul_params_are_qwen2_0_5b_published_count_and_leave_out_the_input_table():
    assert tr.matmul_params(PRESETS["qwen2-0.5b"]) == 494_032_768  # Qwen2.5-0.5B: tied, counted once
    tiny = PRESETS["tiny"]  # untied: its input table is a lookup; what is left equals the tied count
    assert tr.matmul_params(tiny) == tr.matmul_params(tiny.replace(tie_word_embeddings=True))


def test_step_flops_is_palm_six_n_plus_twelve_l_h_q_t_per_token():
    q = PRESETS["qwen2-0.5b"]
    assert tr.step_flops(q, 8, 1024) == 8192 * (6 * 494_032_768 + 12 * 24 * 14 * 64 * 1024)
    # the same 8192 tokens at twice the sequence: only the attention term grows, and doubles
    assert tr.step_flops(q, 4, 2048) - tr.step_flops(q, 8, 1024) == 8192 * 12 * 24 * 896 * 1024


def test_mfu_of_the_issue_figure():
    """Issue 18: 104.5k tokens/s on the H200 in bf16 is 'about 33%' MFU (34.1% by this formula)."""
    flops = tr.step_flops(PRESETS["qwen2-0.5b"], 8, 1024)
    assert tr.mfu(flops, 8192 / 104_500, H200["bf16"]) == pytest.approx(0.3407, abs=5e-4)


def test_compile_time_is_warmup_wall_time_beyond_steady_steps():
    m = tr.Measured(step_s=0.075, peak_bytes=1, warmup_s=[50.0, 0.08, 0.075])
    assert m.compile_s == pytest.approx(50.0 + 0.08 + 0.075 - 3 * 0.075)
    assert tr.Measured(error="boom").compile_s is None


def runs(*argv: str) -> list[tuple]:
    return [(r.preset, r.batch, r.seq, r.precision) for r in tr.parse_args(list(argv)).runs]


def test_default_runs_both_qwen2_shapes_and_tiny_in_both_precisions():
    assert runs() == [("tiny", 16, 256, "fp32"), ("tiny", 16, 256, "bf16"),
                      ("qwen2-0.5b", 8, 1024, "fp32"), ("qwen2-0.5b", 8, 1024, "bf16"),
                      ("qwen2-0.5b", 4, 2048, "fp32"), ("qwen2-0.5b", 4, 2048, "bf16")]
    opts = tr.parse_args([])
    assert (opts.peers, opts.reps, opts.breakdown, opts.json) == (("eager", "compile"), 5, False, None)


def test_subsets_of_shapes_precisions_and_peers():
    assert runs("--shapes", "qwen2-0.5b:4x2048", "--precisions", "bf16") == [("qwen2-0.5b", 4, 2048, "bf16")]
    assert runs("--presets", "tiny", "--precisions", "bf16") == [("tiny", 16, 256, "bf16")]  # the old flag
    assert runs("--shapes", "small:4x128", "small:4x128", "--precisions", "fp32") == [("small", 4, 128, "fp32")]
    assert runs("--shapes", "qwen2-0.5b", "qwen2-0.5b:8x1024", "--precisions", "bf16") == [
        ("qwen2-0.5b", 8, 1024, "bf16"), ("qwen2-0.5b", 4, 2048, "bf16")]
    assert tr.parse_args(["--peers", "compile", "eager"]).peers == ("eager", "compile")  # table order
    assert tr.parse_args(["--peers", "none"]).peers == ()  # ours alone


@pytest.mark.parametrize("argv, says", [
    (["--shapes", "gpt9"], "unknown preset 'gpt9'"),
    (["--shapes", "tiny:16x"], "expected PRESET or PRESET:BATCHxSEQ"),
    (["--shapes", "tiny:0x256"], "batch and seq must be positive"),
    (["--shapes", "tiny:1x513"], "past tiny's max_position_embeddings 512"),
    (["--shapes", "small"], "small has no default shape"),
    (["--precisions", "fp16"], "invalid choice: 'fp16'"),
    (["--peers", "jax"], "invalid choice: 'jax'"),
    (["--peers", "none", "eager"], "--peers none runs ours alone"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--gpus", "2", "0"], "--gpus counts must be at least 1, got 2 0"),
    (["--json", "/nonexistent-dir/out.json"], "not a file in an existing directory"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_a_usage_error_before_any_work(argv, says):
    with pytest.raises(tr.UsageError) as e:
        tr.parse_args(argv)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_gpus_measures_one_gpu_too_for_the_speed_up():
    assert tr.parse_args(["--gpus", "8", "2", "2"]).gpus == [1, 2, 8] and tr.parse_args([]).gpus == []


def test_the_scaling_table_states_speed_up_and_efficiency_against_one_gpu():
    dp = _load("data_parallel")
    rows = [{"gpus": 1, "global_batch": 8, "step_s": 0.070, "tokens_per_s": 8 * 1024 / 0.070, "peak_bytes": 20 * 2**30,
             "wait_ms": None},
            {"gpus": 2, "global_batch": 16, "step_s": 0.074, "tokens_per_s": 16 * 1024 / 0.074,
             "peak_bytes": 15 * 2**30, "wait_ms": 1.25},
            {"gpus": 4, "error": "the ranks exited with code 1"}]
    text = dp.format_scaling("qwen2-0.5b bf16, 8 x 1024 per GPU", dp.with_speedups(rows))
    assert rows[1]["speedup"] == pytest.approx(2 * 0.070 / 0.074) and "speedup" not in rows[2]
    assert "speedup" not in dp.with_speedups([{"gpus": 2, "tokens_per_s": 1.0}])[0]  # no one-GPU row
    assert "1.89x" in text and "94.6%" in text and "1.25" in text and "15.00" in text
    assert "4  failed: the ranks exited with code 1" in text


def test_json_path_in_an_existing_directory_is_accepted(tmp_path):
    assert tr.parse_args(["--json", str(tmp_path / "train.json")]).json == tmp_path / "train.json"
    with pytest.raises(tr.UsageError):
        tr.parse_args(["--json", str(tmp_path)])  # a directory, not a file


def row(preset: str, batch: int, seq: int, precision: str, **results) -> "tr.Row":
    return tr.Row(tr.Run(preset, batch, seq, precision), results)


def figures(step_s: float, gib: float, warmup=(1.0, 0.1)) -> "tr.Measured":
    return tr.Measured(step_s=step_s, peak_bytes=int(gib * GiB), warmup_s=list(warmup))


def measured_rows() -> list:
    return [row("qwen2-0.5b", 8, 1024, "bf16", ours=figures(0.0784, 29.6), eager=figures(0.1237, 32.6),
                compile=figures(0.0757, 22.3, warmup=(52.0, 0.08, 0.0757))),
            row("qwen2-0.5b", 4, 2048, "bf16", ours=figures(0.0800, 20.0), eager=figures(0.1300, 33.0),
                compile=tr.Measured(error="OutOfMemoryError: CUDA out of memory"))]


def test_table_has_a_line_ours_over_torch_compile_for_each_measured_shape():
    text = tr.table(measured_rows(), H200, "NVIDIA H200", 5)
    lines = text.splitlines()
    bar = [line.split() for line in lines if "ours / torch.compile" in line]
    assert bar == [["ours", "/", "torch.compile", "0.97x", "tokens/s,", "1.33x", "peak", "memory"]]
    assert sum("ours / torch eager" in line for line in lines) == 2
    assert any("torch.compile" in line and "failed: OutOfMemoryError: CUDA out of memory" in line for line in lines)
    ours = next(line for line in lines if line.startswith("  qwen2-0.5b      8 x 1024"))
    assert ours.split()[5:] == ["ours", "104,490", "78.40", "34.1%", "29.60", "-"]  # 8192 / 0.0784
    compiled = next(line.split() for line in lines if line.split()[:1] == ["torch.compile"])
    assert compiled == ["torch.compile", "108,217", "75.70", "35.3%", "22.30", "51.9"]  # 52 + 0.08 - 2 * 0.0757
    assert "989 TFLOP/s bf16" in text and "26.45 TFLOP (N = 494,032,768)" in text


def test_table_leaves_mfu_out_on_a_gpu_without_a_rated_peak():
    text = tr.table(measured_rows()[:1], None, "Some GPU", 5)
    assert "none known for this GPU, MFU left out" in text
    ours = next(line for line in text.splitlines() if line.startswith("  qwen2-0.5b"))
    assert ours.split()[8] == "-"


def test_json_holds_every_figure():
    first = measured_rows()[0].as_dict(H200)
    json.dumps(first)  # serializable as it stands
    assert first["model_flops_per_step"] == tr.step_flops(PRESETS["qwen2-0.5b"], 8, 1024)
    for system in ("ours", "eager", "compile"):
        assert {"tokens_per_s", "ms_per_step", "mfu", "peak_bytes", "peak_GiB", "warmup_step_s"} <= set(first[system])
    assert first["compile"]["compile_s"] == pytest.approx(52.0 + 0.08 - 2 * 0.0757)
    assert first["ours_vs_compile"] == pytest.approx({"tokens_per_s": 0.0757 / 0.0784, "peak_memory": 29.6 / 22.3},
                                                     rel=1e-6)
    failed = measured_rows()[1].as_dict(H200)
    assert failed["compile"] == {"error": "OutOfMemoryError: CUDA out of memory"}
    assert failed["ours_vs_compile"] is None and failed["ours_vs_eager"] is not None


def test_json_report_says_what_the_figures_mean():
    rows = measured_rows()
    doc = tr.report(rows, H200, "NVIDIA H200", 5, {"ours": 2, "eager": 2, "compile": 3}, {"torch": "2.11"})
    assert json.loads(json.dumps(doc))["rows"] == [r.as_dict(H200) for r in rows]
    assert "6 N + 12 L H Q T" in doc["model_flops"] and "warm-up wall time" in doc["compile_s"]
    assert doc["rated_peak_TFLOPs"] == {"bf16": 989.0, "fp32": 67.0} and "median" in doc["step_time"]


def test_breakdown_sums_by_kind_and_by_kind_and_grid_and_the_gemms_by_module_and_pass():
    b = tr.breakdown([("gemm", (4, 2, 1), 2.0, "gemm_wgmma model.layers.0.mlp.down_proj dW -> grad w0"),
                      ("cast", (8,), 0.5, "cast -> d o[bf16]"),
                      ("gemm", (4, 2, 1), 1.0, "gemm_wgmma model.layers.1.mlp.down_proj dW -> split-K partial sums"),
                      ("gemm", (1, 1, 1), 0.25, "gemm_wgmma lm_head forward -> logits")])
    assert b["launches"] == 4 and b["ms"] == pytest.approx(3.75)
    assert b["by_kind_ms"] == {"gemm": 3.25, "cast": 0.5}
    assert b["costliest_groups"][0] == {"kind": "gemm", "grid": [4, 2, 1], "launches": 2, "ms": 3.0}
    assert b["gemms"] == [{"what": "mlp.down_proj dW", "launches": 2, "ms": 3.0},
                          {"what": "lm_head forward", "launches": 1, "ms": 0.25}]
    text = tr.format_breakdown("qwen2-0.5b 8x1024 bf16", b)
    assert "4 launches, 3.75 ms" in text and "86.7%" in text and "mlp.down_proj dW" in text
    assert tr.format_breakdown("empty", tr.breakdown([]))  # no division by zero
    b["host_ms"] = {"launched": 9.5, "graph": 0.25}
    assert "9.50 ms launch by launch, 0.25 ms as one CUDA graph" in tr.format_breakdown("with host", b)


def test_bench_train_refuses_bad_input_in_one_line():
    """The script itself (needs torch and transformers importable; no GPU: it stops before any work)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--shapes", "gpt9"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(BENCH.parent)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["bench_train.py: error: --shapes 'gpt9': unknown preset 'gpt9'; "
                                                f"presets: {', '.join(PRESETS)}"]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_every_gemm_of_the_models_plan_is_attributed_to_its_module_and_pass(monkeypatch, name):
    """The breakdown reads the plan's labels: each GEMM launch of a bf16 step (built on the dry
    device) names one module and pass, every linear module has its forward, dX and dW (small: the
    q/k/v forward with RoPE in its epilogue, "forward + RoPE", counts as the forward)."""
    import numpy as np

    from dry_device import DryCache, dry_device
    from model.config import preset
    from model.cuda_model import CudaBackend
    from model.optim import AdamWSettings
    from model.params import param_shapes
    from model.kernels import rope_in_gemm
    from model.precision import Precision
    config = preset(name).replace(num_layers=1)
    assert rope_in_gemm(config, Precision.BF16) == (name == "small")
    with dry_device(monkeypatch):
        model = CudaBackend(config, {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()},
                            AdamWSettings(), cache=DryCache(), precision=Precision.BF16)
        gemms = [s for s in model.plan(2, 64) if s.kind.startswith("gemm")]
        roles = {tr.gemm_role(s.label) for s in gemms}
        assert not [s.label for s in gemms if "DeviceArray" in s.label]  # C named, not C's tensor map (tma_store)
        model.close()
    assert None not in roles
    modules = {role.rsplit(" ", 1)[0] for role in roles}
    assert roles == {f"{m} {p}" for m in modules for p in ("forward", "dX", "dW")}
    assert "lm_head" in modules and "mlp.down_proj" in modules

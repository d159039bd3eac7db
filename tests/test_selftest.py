"""The GPU self-test's parts that run without a GPU: planning per machine, the table, the skip."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_runtime import export_test_artifacts

from maven_edge.benchmarks.gpu_selftest import (
    GpuEnv,
    RunResult,
    SelftestOptions,
    compare_tokens,
    plan_selftest,
    render_table,
    run_selftest,
)

GPU = {"name": "Orin (nvgpu)", "compute_capability": "8.7"}
ALL_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_plan_on_jetpack_6_and_desktop_10x():
    plan = plan_selftest(GpuEnv(gpu=GPU, tensorrt="10.3.0", onnxruntime="1.20.0", providers=ALL_EPS))
    assert plan.skipped is None and plan.target_trt == "10.3"
    assert [(p.name, p.recipe, p.source) for p in plan.prep] == [
        ("fp32", None, None), ("int8-trt", "int8-trt", "fp32"), ("engines-fp16", "fp16", "fp32"),
        ("engines-int8", "int8", "int8-trt")]
    assert [r.name for r in plan.runs if not r.skip] == ["cpu fp32 (reference)", "trt fp16 engines",
                                                          "trt int8 engines", "ort cuda fp32", "ort tensorrt-ep fp32"]
    jp60 = plan_selftest(GpuEnv(gpu=GPU, tensorrt="8.6.2", providers=["CPUExecutionProvider"]))
    assert jp60.target_trt == "8.6" and "for TensorRT 8.6" in jp60.prep[0].what  # opset 17
    assert [r.name for r in jp60.runs if r.skip] == ["ort cuda fp32", "ort tensorrt-ep fp32"]


def test_plan_on_tensorrt_11_builds_typed_engines():
    plan = plan_selftest(GpuEnv(gpu=GPU, tensorrt="11.4.0.106", providers=["CPUExecutionProvider"]),
                         have_artifacts=True)
    assert [(p.name, p.recipe, p.source) for p in plan.prep] == [
        ("int8-trt", "int8-trt", "fp32"), ("fp16", "fp16", "fp32"), ("engines-fp16", "typed", "fp16"),
        ("engines-int8", "typed", "int8-trt")]


def test_plan_without_a_gpu_skips_with_the_reason():
    plan = plan_selftest(GpuEnv(tensorrt_error="no tensorrt (No module named 'tensorrt')",
                                gpu_error="no cuda-python", onnxruntime="1.31.1", providers=["CPUExecutionProvider"]))
    assert plan.skipped and "no tensorrt" in plan.skipped and "onnxruntime-gpu" in plan.skipped
    only_cuda = plan_selftest(GpuEnv(gpu_error="no cuda-python", tensorrt_error="no tensorrt",
                                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert only_cuda.skipped is None and [r.name for r in only_cuda.runs if not r.skip] == [
        "cpu fp32 (reference)", "ort cuda fp32"]


def test_table():
    ref = RunResult("cpu fp32 (reference)", 1.0, 3, tokens=[[1, 2], [3, 4], [5]], ttft_ms=12.34,
                    decode_ms_per_token=1.5)
    fp16 = RunResult("trt fp16 engines", 40.0, 3, tokens=[[1, 2], [3, 9], [6]], ttft_ms=2.0, decode_ms_per_token=0.25)
    compare_tokens(ref, ref.tokens)
    compare_tokens(fp16, ref.tokens)
    assert (fp16.identical, fp16.first_token) == (1, 2)
    table = render_table([ref, fp16, RunResult("ort cuda fp32", status="skipped: no CUDAExecutionProvider")], "hdr")
    lines = table.splitlines()
    assert lines[0] == "hdr" and lines[1].startswith("| backend ") and len({len(x) for x in lines[1:]}) == 1
    assert "| trt fp16 engines     | 40.0    | 1/3       | 2/3       | 2.0     | 0.25" in table
    assert "skipped: no CUDAExecutionProvider" in table


def test_cli_skips_cleanly_here(capsys):
    from maven_edge.benchmarks.gpu_selftest import probe_environment
    from maven_edge.cli import main

    env = probe_environment()
    if env.trt_ready or "CUDAExecutionProvider" in env.providers:
        pytest.skip("this machine has a GPU path: run `maven-edge selftest --gpu` itself")
    assert main(["selftest", "--gpu"]) == 0
    assert capsys.readouterr().out.startswith("GPU self-test skipped: no GPU path can run here")
    assert main(["selftest", "--gpu", "--require-gpu"]) == 2


def test_run_records_failures_in_the_table(pytestconfig, tmp_path):
    """The run loop on the CPU: the reference answers; a GPU provider this onnxruntime lacks becomes
    an error row instead of an exception."""
    artifacts = export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))
    env = GpuEnv(tensorrt_error="no tensorrt", gpu_error="no cuda-python", onnxruntime="1.31.1",
                 providers=["CUDAExecutionProvider", "CPUExecutionProvider"])  # claims CUDA; this onnxruntime has none
    plan, results = run_selftest(SelftestOptions(tmp_path, questions=2, new_tokens=3, artifacts=str(artifacts)), env,
                                 log=lambda m: None)
    by = {r.name: r for r in results}
    ref = by["cpu fp32 (reference)"]
    assert ref.status == "ok" and ref.questions == 2 and ref.identical == 2 and ref.ttft_ms is not None
    assert by["ort cuda fp32"].status.startswith("error: BackendError: execution provider cuda")
    assert by["trt fp16 engines"].status.startswith("skipped: no tensorrt")

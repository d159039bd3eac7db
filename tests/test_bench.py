"""Benchmark suite: measurement primitives, cost model, GGUF conversion, report maths, and one
`maven-edge bench --quick` run end to end (ORT + torch backends and the transformers anchor on a
small exported model). No test asserts an absolute time."""

from __future__ import annotations

import importlib.util
import json
import mmap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from maven_edge.benchmarks.harness import (
    PeakRSS,
    describe_machine,
    machine_info,
    repeat,
    summarize,
    summarize_records,
)
from maven_edge.benchmarks.roofline import (
    BYTES_PER_PARAM,
    DecoderCost,
    copy_bandwidth,
    decode_roofline,
    roofline_row,
)
from maven_edge.cli import main as cli
from maven_edge.core.config import get_config

# A narrow tiny model: export and every engine stay cheap on a 2-core machine.
SMALL = ["llm.num_layers=2", "vision.num_layers=1", "discrete.num_layers=1"]


# ---- harness --------------------------------------------------------------------------------------


def test_summarize_and_spread() -> None:
    s = summarize([10.0, 12.0, 11.0])
    assert (s.median, s.min, s.max, s.n) == (11.0, 10.0, 12.0, 3)
    assert s.spread == pytest.approx(2.0 / 11.0)
    assert summarize([5.0]).spread == 0.0
    assert "±" in s.fmt(1, "ms") and "±" not in summarize([5.0]).fmt()
    with pytest.raises(ValueError):
        summarize([])
    stats = summarize_records([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}])
    assert set(stats) == {"a"} and stats["a"].median == 2.0


def test_repeat_discards_warmup() -> None:
    calls = []
    out = repeat(lambda: calls.append(1) or len(calls), warmup=2, repeats=3)
    assert out == [3, 4, 5] and len(calls) == 5
    with pytest.raises(ValueError):
        repeat(lambda: 0, repeats=0)


def test_peak_rss_sees_an_allocation() -> None:
    with PeakRSS(interval_s=0.001) as mem:
        # 64 MB of fresh anonymous pages, every page touched: a malloc'd numpy array may reuse heap
        # that earlier tests left resident, and then RSS does not grow at all
        block = mmap.mmap(-1, 64 * 1024 * 1024)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        # held until the sampler thread has run (up to 5 s): on a loaded machine it may not be
        # scheduled within a fixed short sleep, and a freed block is then never seen
        deadline = time.monotonic() + 5.0
        while mem.peak_bytes - mem.start_bytes <= 32 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert mem.peak_bytes >= mem.start_bytes
    assert mem.delta_bytes > 32 * 1024 * 1024


def test_machine_info_describes_the_machine() -> None:
    info = machine_info(threads=1)
    for key in ("cpu", "logical_cores", "libraries", "onnxruntime_providers", "gpus"):
        assert key in info
    assert info["libraries"]["numpy"] and "onnxruntime" in info["libraries"]
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert "logical cores" in describe_machine(info)


# ---- roofline ----------------------------------------------------------------------------------------


def test_decoder_cost_matches_the_model() -> None:
    from maven_edge.model_src.checkpoint import build_model

    cfg = get_config("tiny", SMALL)
    model = build_model(cfg, seed=0)
    cost = DecoderCost.from_llm(cfg.llm, cfg.vocab_size)
    assert cost.total_params == sum(p.numel() for p in model.llm.parameters())
    edge = get_config("edge-small")
    edge_cost = DecoderCost.from_llm(edge.llm, edge.vocab_size)
    assert 0.42e9 < edge_cost.total_params < 0.44e9  # the "0.43B params"
    # ... and its "llama.cpp f32 reads ~1.58 GB of weights per token"
    assert edge_cost.decode_bytes_per_token("fp32", 0) == pytest.approx(1.58e9, rel=0.01)


def test_roofline_maths() -> None:
    cfg = get_config("edge-small")
    cost = DecoderCost.from_llm(cfg.llm, cfg.vocab_size)
    fp32 = cost.decode_bytes_per_token("fp32", context=0)
    assert fp32 == pytest.approx(cost.matmul_params * 4, rel=0.01)
    kv = cost.decode_bytes_per_token("fp32", context=100) - fp32
    assert kv == 100 * 2 * cfg.llm.num_layers * cfg.llm.num_kv_heads * cfg.llm.head_dim * 4
    assert cost.decode_bytes_per_token("int4", 0) < cost.decode_bytes_per_token("q8_0", 0) < fp32
    assert decode_roofline(cost, "fp32", 0, bandwidth_gbs=60.0) == pytest.approx(60e9 / fp32)
    flops = cost.prefill_flops(256)
    assert flops > 2 * cost.layer_matmul_params * cfg.llm.num_layers * 256
    assert cost.prefill_flops(256, lm_head_positions=256) > flops
    limits = SimpleNamespace(bandwidth_gbs=50.0, matmul_gflops=100.0)
    row = roofline_row(cost, "fp32", 256, 64, decode_tok_s=20.0, prefill_ms=1000.0, limits=limits)
    assert row["decode_fraction_of_roofline"] == pytest.approx(20.0 / row["decode_roofline_tok_s"])
    assert row["prefill_fraction_of_matmul"] == pytest.approx(flops / 1e9 / 100.0)
    with pytest.raises(ValueError):
        cost.decode_bytes_per_token("int3", 0)
    assert set(BYTES_PER_PARAM) >= {"fp32", "int4", "q8_0", "q4_0"}


def test_copy_bandwidth_is_positive() -> None:
    assert copy_bandwidth(mb=8, threads=2, repeats=2) > 0


# ---- efficiency token math ---------------------------------------------------------------------------


def test_token_table_paper_geometry() -> None:
    from maven_edge.benchmarks.efficiency import token_table

    cfg = get_config("paper")
    rows = {(r["mode"], r["images"]): r for r in token_table(cfg, [1, 4])}
    assert rows[("hybrid", 1)]["visual_tokens_per_image"] == 32 + 144
    assert rows[("continuous", 1)]["visual_tokens_per_image"] == 576
    assert rows[("discrete", 4)]["prompt_tokens"] == 4 * (32 + 2)
    assert rows[("continuous", 4)]["prompt_tokens"] / rows[("hybrid", 4)]["prompt_tokens"] > 3.0


# ---- GGUF conversion (llama.cpp anchor) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """HF-format checkpoints of a Llama-style (no biases) and a Qwen2-style (q/k/v biases) decoder."""
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.hf_import import save_hf_llama

    out = {}
    for name, extra in (("llama", []), ("qwen2", ["llm.attention_bias=true"])):
        model = build_model(get_config("tiny", SMALL + extra), seed=0)
        out[name] = save_hf_llama(model.llm, tmp_path_factory.mktemp(name) / "hf", tokenizer=model.tokenizer)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_conversion(hf_dirs, tmp_path, arch) -> None:
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from maven_edge.benchmarks.anchors.llama_cpp import _permute_rope, convert_hf_to_gguf

    hf = hf_dirs[arch]
    cfg = json.loads((hf / "config.json").read_text())
    state = load_file(str(hf / "model.safetensors"))
    path = convert_hf_to_gguf(hf, tmp_path / "m.gguf", "fp32")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    per_layer = 12 if arch == "qwen2" else 9
    assert len(tensors) == 3 + per_layer * cfg["num_hidden_layers"]
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"]
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(cfg["hidden_size"], cfg["hidden_size"])
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    expect = _permute_rope(hf_q, cfg["num_attention_heads"]) if arch == "llama" else hf_q
    np.testing.assert_array_equal(q, expect)
    # q8_0: every 2-D weight quantized, dequantizing close to the original
    path8 = convert_hf_to_gguf(hf, tmp_path / "m8.gguf", "q8_0")
    t8 = {t.name: t for t in gguf.GGUFReader(str(path8)).tensors}
    assert t8["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t8["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    deq = gguf.quants.dequantize(t8["output.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(deq.reshape(state["lm_head.weight"].shape), state["lm_head.weight"], atol=2e-3)
    assert path8.stat().st_size < path.stat().st_size / 3


def test_llama_cpp_reports_reference_figures_only_when_not_built(tmp_path) -> None:
    from maven_edge.benchmarks.anchors import EngineContext, make_engine

    ctx = EngineContext(work_dir=tmp_path, hf_dir=tmp_path, checkpoint=None,
                        extra={"llama_cpp_error": "cmake is not installed here"})
    engine = make_engine("llamacpp", ctx, "q4_0")
    assert "cmake is not installed here" in engine.unavailable()
    assert engine.reference() is None  # tmp_path holds no edge-small config: the figures do not apply
    from maven_edge.benchmarks.anchors.llama_cpp import REFERENCE_GEOMETRY

    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_GEOMETRY))
    assert engine.reference()["decode_tok_s"] == 128.0
    built = make_engine("llamacpp", EngineContext(work_dir=tmp_path, hf_dir=tmp_path, checkpoint=None,
                                                  extra={"llama_cpp_bin": str(tmp_path)}), "q4_0")
    if importlib.util.find_spec("gguf") is not None:
        assert built.unavailable() is None  # a build exists: measured, never the reference figures


def test_llama_cpp_text_decode_rate_is_llama_benchs(tmp_path, monkeypatch) -> None:
    """llama-bench reports no token ids: the decode rate comes from its own tokens/s, not from an
    empty token list (which read 0.0 tok/s in the first full run)."""
    from maven_edge.benchmarks.anchors import EngineContext, TextSpec, make_engine
    from maven_edge.benchmarks.anchors import llama_cpp as lc

    monkeypatch.setattr(lc, "run_llama_bench", lambda *a, **k: (512.0, 40.0))  # prompt tok/s, decode tok/s
    engine = make_engine("llamacpp", EngineContext(work_dir=tmp_path, hf_dir=tmp_path, checkpoint=None,
                                                   extra={"llama_cpp_bin": str(tmp_path)}), "q8_0")
    engine.load(lc.Prepared(path=str(tmp_path / "m.gguf"), bytes=0, seconds=0.0, cached=True))
    record = engine.generate(TextSpec(prompt_len=256, new_tokens=64)).record()
    assert record["decode_tok_s"] == pytest.approx(40.0)
    assert record["decode_ms_per_token"] == pytest.approx(25.0)
    assert record["prefill_ms"] == pytest.approx(500.0)


def test_llama_cpp_build_says_why_it_cannot_build(tmp_path, monkeypatch) -> None:
    from maven_edge.benchmarks.anchors import llama_cpp_build as b

    res = b.ensure_build(tmp_path, src=tmp_path / "nowhere", jobs=1)
    assert not res.ok and "no llama.cpp sources" in res.error
    monkeypatch.setattr(b.shutil, "which", lambda name: None)
    res = b.ensure_build(tmp_path, src=tmp_path, jobs=1)
    assert not res.ok and "cmake" in res.error
    flags = b.cmake_flags()
    assert "-DGGML_NATIVE=ON" in flags and "-DBUILD_SHARED_LIBS=OFF" in flags
    if b._is_x86():
        assert any("-mno-amx-int8" in f for f in flags)  # ggml's AMX kernels crash at load (ldtilecfg)


def test_mmproj_conversion_of_the_shipped_tiny_model(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from maven_edge.benchmarks.anchors.llama_cpp import convert_mmproj_to_gguf
    from maven_edge.model_src.resources import shipped_checkpoint

    ckpt = shipped_checkpoint("tiny")
    cfg = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    reader = gguf.GGUFReader(str(convert_mmproj_to_gguf(ckpt, tmp_path / "mmproj.gguf")))

    def field(name):
        f = reader.fields[name]
        return bytes(f.parts[-1]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[-1][0]

    assert field("general.architecture") == "clip" and field("clip.projector_type") == "mlp"
    # libmtmd runs block_count - 1 layers for an MLP projector: exactly the layers our encoder runs
    used = cfg["vision"]["num_layers"] + 1 + cfg["vision"]["feature_layer"]
    assert field("clip.vision.block_count") == used + 1
    assert field("clip.vision.projection_dim") == cfg["llm"]["hidden_size"]
    assert not field("clip.use_gelu")  # quick_gelu
    tensors = {t.name: t for t in reader.tensors}
    assert {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "mm.0.weight",
            "mm.2.bias", f"v.blk.{used}.ffn_up.weight"} <= set(tensors)
    w = np.asarray(tensors["mm.0.weight"].data).reshape(state["projector.linear_1.weight"].shape)
    np.testing.assert_array_equal(w, state["projector.linear_1.weight"])
    q = np.asarray(tensors["v.blk.0.attn_q.weight"].data).reshape(state["vision.encoder.layers.0.self_attn.q_proj.weight"].shape)
    np.testing.assert_array_equal(q, state["vision.encoder.layers.0.self_attn.q_proj.weight"])


MTMD_LOG = """encoding mtmd batch, n_chunks = 2 (done = 1, total = 4)
mtmd batch encoding done in 812 ms
image decoded (batch 1/1) in 95 ms
llama_perf_context_print:        load time =     450.10 ms
llama_perf_context_print: prompt eval time =     301.50 ms /   410 tokens (    0.74 ms per token,  1359.87 tokens per second)
llama_perf_context_print:        eval time =     250.00 ms /     7 runs   (   35.71 ms per token,    28.00 tokens per second)
llama_perf_context_print:       total time =    1500.00 ms /   417 tokens
"""


def test_mtmd_log_parsing() -> None:
    from maven_edge.benchmarks.anchors.llama_cpp import parse_mtmd_log
    from maven_edge.core.errors import BackendError

    run = parse_mtmd_log(MTMD_LOG, wall_ms=2000.0)
    assert (run.encode_ms, run.prompt_eval_ms, run.prompt_tokens, run.eval_runs) == (812.0, 301.5, 410, 7)
    assert run.ttft_ms == pytest.approx(1113.5) and run.decode_tok_s == pytest.approx(28.0)
    with pytest.raises(BackendError, match="no timings"):
        parse_mtmd_log("main: loading model\n")


# ---- report maths on a synthetic run -----------------------------------------------------------------------


def _fake_report(tmp_path):
    from maven_edge.benchmarks.suite import BenchOptions, BenchReport

    cfg = get_config("tiny", SMALL)

    def row(engine, precision, tok_s, prefill_ms, tokens):
        return {"engine": engine, "label": engine, "precision": precision, "status": "measured", "tokens": tokens,
                "peak_rss_mb": 100.0, "prepared": {"bytes": 1e6},
                "stats": {"decode_tok_s": summarize([tok_s * 0.95, tok_s, tok_s * 1.05]).to_dict(),
                          "prefill_ms": summarize([prefill_ms]).to_dict()}}

    text = [row("ort", "fp32", 30.0, 400.0, [1, 2, 3, 4]), row("torch", "fp32", 10.0, 900.0, [1, 2, 3, 4]),
            row("genai", "fp32", 25.0, 500.0, [1, 2, 3, 4]), row("hf", "fp32", 12.0, 1000.0, [1, 2, 9, 9]),
            row("ort", "int4", 90.0, 300.0, [1, 2, 5, 5]), row("genai", "int4", 100.0, 300.0, [1, 2, 5, 5]),
            row("ort", "int8", 40.0, 500.0, [1, 2, 5, 5]), row("ort", "int8-dynamic", 60.0, 300.0, [1, 2, 5, 5]),
            row("llamacpp", "q8_0", 45.0, 400.0, [1, 2, 5, 5]),
            {"engine": "llamacpp", "label": "llama.cpp", "precision": "fp32", "status": "unavailable",
             "reason": "not installed", "reference": {"decode_tok_s": 38.0, "prefill_ms_256": 727.0}}]

    def cell(mode, n, tokens, ttft):
        st = {k: summarize([v]).to_dict() for k, v in {
            "ttft_ms": ttft, "prefill_ms": ttft / 2, "visual_ms": 10.0, "total_ms": ttft + 50,
            "decode_step_ms": 5.0, **{f"{s}_ms": 1.0 for s in ("preprocess", "vision", "discrete", "h_eos", "selector",
                                                                 "assemble", "decode")}}.items()}
        per = cfg.visual_tokens_per_image(mode)
        return {"mode": mode, "images": n, "status": "measured", "prompt_tokens": tokens, "visual_tokens_per_image": per,
                "new_tokens": 4, "finish_reason": "length", "stats": st}

    cells = [cell("hybrid", 4, 220, 100.0), cell("continuous", 4, 290, 150.0), cell("discrete", 4, 150, 60.0)]
    o = BenchOptions(out=tmp_path, preset="tiny", prompt_len=256, new_tokens=64).resolved()
    report = BenchReport(options={"prompt_len": 256, "new_tokens": 64, "threads": 2, "repeats": 3, "command": "x"},
                         machine=machine_info(2), source={"preset": "tiny", "config": cfg.to_dict()},
                         limits={"copy_gbs": 10.0, "gemv_gbs": 20.0, "matmul_gflops": 100.0, "threads": 2,
                                 "copy_mb": 8, "method": "test", "bandwidth_gbs": 20.0},
                         pipeline={"ort": {"status": "measured", "peak_rss_mb": 200.0, "cells": cells}},
                         text=text, ratios={}, roofline=[], efficiency={}, notes=[], seconds=1.0)
    return report, o


def test_report_ratios_roofline_efficiency_and_files(tmp_path) -> None:
    from maven_edge.benchmarks.report import analyse, write_outputs

    report, o = _fake_report(tmp_path)
    analyse(report, o)
    r = report.ratios
    assert r["ort_fp32_vs_genai_fp32"]["decode_ratio"] == pytest.approx(30.0 / 25.0)
    assert r["ort_fp32_vs_genai_fp32"]["holds"] is True
    assert r["ort_fp32_vs_hf_fp32"]["decode_ratio"] == pytest.approx(2.5) and r["ort_fp32_vs_hf_fp32"]["holds"]
    assert r["ort_int4_vs_genai_int4"]["holds"] is True  # 0.9 exactly meets the target
    assert r["ort_fp32_vs_llamacpp_fp32"]["anchor_figure"] == "reference"
    # both int8 decoders against Q8_0, each with the same 1.2x target
    assert r["ort_int8_vs_llamacpp_q8_0"]["decode_ratio"] == pytest.approx(40.0 / 45.0)
    assert r["ort_int8_vs_llamacpp_q8_0"]["holds"] is False
    assert r["ort_int8_dynamic_vs_llamacpp_q8_0"]["decode_ratio"] == pytest.approx(60.0 / 45.0)
    assert r["ort_int8_dynamic_vs_llamacpp_q8_0"]["holds"] is True
    assert {x["precision"] for x in report.roofline if x["engine"] == "ort"} >= {"int8", "int8-dynamic"}
    assert r["ort_fp32_vs_genai_fp32"]["prefill_speedup"] == pytest.approx(500.0 / 400.0)
    assert r["prefill_per_token_hybrid4_vs_genai"]["ours_ms_per_token"] == pytest.approx(50.0 / 220)
    hf = next(t for t in report.text if t["engine"] == "hf")
    assert (hf["agree_tokens"], hf["agree_with"]) == (2, "torch fp32")
    assert {x["engine"] for x in report.roofline} >= {"ort", "genai", "llamacpp"}
    eff = report.efficiency["ort"]
    assert eff["claim_4_images"]["ttft_speedup"] == pytest.approx(1.5)
    assert eff["claim_4_images"]["holds_2x"] is False
    write_outputs(report, tmp_path, figures_dir=str(tmp_path / "figs"))
    md = (tmp_path / "summary.md").read_text()
    assert "not measured here" in md and "does not hold" in md
    for name in ("results.json", "text.csv", "stages.csv", "efficiency.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "bench_tiny_decode.png", "bench_tiny_stages.png", "bench_tiny_ttft.png"]


# ---- options ------------------------------------------------------------------------------------------------


def test_first_answer_targets_against_llama_cpp_mtmd(tmp_path) -> None:
    from maven_edge.benchmarks.report import analyse, markdown, ttft_rows, write_outputs

    report, o = _fake_report(tmp_path)
    one = {"ttft_ms": summarize([200.0]).to_dict(), "vision_ms": summarize([100.0]).to_dict(),
           "prefill_ms": summarize([100.0]).to_dict(), "decode_tok_s": summarize([30.0]).to_dict()}
    four = {k: summarize([v["median"] * 4]).to_dict() for k, v in one.items()}
    report.mtmd = {"fp32": {"status": "measured", "cells": [
        {"images": 1, "status": "measured", "prompt_tokens": 210, "stats": one},
        {"images": 4, "status": "measured", "prompt_tokens": 800, "stats": four}]},
        "q4_0": {"status": "failed", "reason": "boom"}}
    cells = report.pipeline["ort"]["cells"]
    in_context = dict(cells[0], mode="hybrid-context",  # hybrid with h_eos read in the prefill: 80 ms
                      stats=dict(cells[0]["stats"], ttft_ms=summarize([80.0]).to_dict()))
    cells.append(in_context)
    analyse(report, o)
    ctx = {t["target"]: t for t in report.ratios["first_answer"] if t["pipeline"] == "ort hybrid-context"}
    assert ctx["hybrid_4_images_vs_own_continuous"]["speedup"] == pytest.approx(150.0 / 80.0)
    targets = {t["target"]: t for t in report.ratios["first_answer"] if t["pipeline"] == "ort"}
    # 4 images: llama.cpp 800 ms vs our hybrid 100 ms; our continuous 150 ms
    assert targets["hybrid_4_images_vs_llamacpp_mtmd_f32"]["speedup"] == pytest.approx(8.0)
    assert targets["hybrid_4_images_vs_llamacpp_mtmd_f32"]["holds"] is True
    assert targets["hybrid_4_images_vs_own_continuous"]["speedup"] == pytest.approx(1.5)
    assert targets["hybrid_4_images_vs_own_continuous"]["holds"] is False
    assert "hybrid_1_image_vs_llamacpp_mtmd_f32" not in targets  # no 1-image hybrid cell in the fake run
    rows = {r["images"]: r for r in ttft_rows(report)}
    assert rows[4]["llama.cpp mtmd fp32"] == 800.0 and rows[4]["ort hybrid"] == 100.0
    assert rows[4]["ort hybrid-context"] == 80.0
    md = markdown(report)
    assert "vs llama.cpp's multimodal runtime" in md and "**missed**" in md and "q4_0: failed: boom" in md
    write_outputs(report, tmp_path)
    assert "llama.cpp mtmd fp32" in (tmp_path / "ttft.csv").read_text()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--out", "x"], "--preset"),
    (["bench", "--preset", "tiny", "--backends", "trt9", "--out", "x"], "backend"),
    (["bench", "--preset", "tiny", "--anchors", "vllm", "--out", "x"], "anchor"),
    (["bench", "--preset", "tiny", "--modes", "dense", "--out", "x"], "mode"),
    (["bench", "--preset", "tiny", "--new-tokens", "1", "--out", "x"], "new-tokens"),
    (["bench", "--preset", "tiny", "--checkpoint", "c", "--out", "x"], "not both"),
])
def test_bad_options_are_refused(argv, message, capsys) -> None:
    assert cli(argv) == 2
    assert message in capsys.readouterr().err


def test_int8_text_rows_make_their_recipes() -> None:
    """The text section's ort int8 rows: `int8` measures the 8-bit MatMulNBits decoder (int8-weight),
    `int8-dynamic` the per-channel dynamic one; each recipe is made only when its row is asked for."""
    from maven_edge.benchmarks.suite import BenchOptions, _recipes_to_make

    def make(precisions):
        return _recipes_to_make(BenchOptions(out="x", preset="tiny", sections=["text"], precisions=precisions))

    assert make(None) == ["int8-weight", "int8-dynamic"]
    assert make(["fp32", "int8-dynamic"]) == ["int8-dynamic"]
    assert make(["fp32", "int4"]) == []
    # a pipeline recipe with the same decoder serves the text row: latency-int8's is int8-dynamic
    both = BenchOptions(out="x", preset="tiny", sections=["text", "pipeline"], precisions=["int8", "int8-dynamic"],
                        pipeline_recipes=["fp32", "latency-int8"])
    assert _recipes_to_make(both) == ["latency-int8", "int8-weight"]


def test_quick_defaults() -> None:
    from maven_edge.benchmarks.suite import BenchOptions

    o = BenchOptions(out="x", quick=True).resolved()
    assert o.preset == "tiny" and o.images == [1, 2] and o.new_tokens <= 8 and o.repeats <= 2
    assert o.threads == 1 and o.export is False


# ---- end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_artifacts(pytestconfig) -> Path:
    """A small tiny-geometry model exported once (cached across sessions like the runtime tests do)."""
    from maven_edge.core.errors import MavenError
    from maven_edge.core.manifest import load_manifest

    out = Path(pytestconfig.cache.mkdir("maven-bench-artifacts")) / "tiny-small"
    try:
        m = load_manifest(out, verify=True)
        if m.extra.get("source", {}).get("overrides") == SMALL:
            return out
    except MavenError:
        pass
    argv = ["export", "--preset", "tiny", "--out", str(out), "--force", "--no-progress"]
    for s in SMALL:
        argv += ["--set", s]
    assert cli(argv) == 0
    return out


def test_quick_bench_end_to_end(small_artifacts, tmp_path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--artifacts", str(small_artifacts), "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--no-progress"]
    assert cli(argv) == 0
    res = json.loads((out / "results.json").read_text())
    text = {(r["engine"], r["precision"]): r for r in res["text"]}
    for key in (("ort", "fp32"), ("torch", "fp32"), ("hf", "fp32")):
        assert text[key]["status"] == "measured", text[key]
        assert text[key]["stats"]["decode_tok_s"]["median"] > 0
        assert text[key]["new_tokens"] == [res["options"]["new_tokens"]] * res["options"]["repeats"]
    # same weights, fp32, greedy: every engine produces the reference tokens
    for key in (("ort", "fp32"), ("hf", "fp32")):
        assert text[key]["agree_tokens"] == text[key]["compared_tokens"] > 0
    assert res["ratios"]["ort_fp32_vs_hf_fp32"]["decode_ratio"] > 0
    cells = res["pipeline"]["ort"]["cells"]
    assert {(c["mode"], c["images"]) for c in cells} == {(m, n) for m in ("hybrid", "continuous", "discrete")
                                                        for n in (1, 2)}
    assert all(c["status"] == "measured" for c in cells)
    hybrid1 = next(c for c in cells if c["mode"] == "hybrid" and c["images"] == 1)
    assert hybrid1["stats"]["h_eos_ms"]["median"] > 0 and hybrid1["stats"]["prefill_ms"]["median"] > 0
    assert res["limits"]["bandwidth_gbs"] > 0 and res["roofline"]
    assert res["efficiency"]["ort"]["rows"][0]["visual_token_reduction"] > 1
    assert res["machine"]["libraries"]["onnxruntime"]
    caches = res["caches"]["fp32"]
    assert caches["status"] == "measured", caches
    assert caches["seen_image"]["visual_stage_ms_max"] == 0.0  # the visual stages were skipped
    assert caches["followup"]["speedup"] > 1 and caches["concurrent"]["aggregate_tok_s"] > 0
    # p95 gaps between tokens, each stream timed token by token (finite, positive)
    conc = caches["concurrent"]
    assert conc["single_p95_gap_ms"] > 0 and all(g > 0 for run in conc["runs"] for g in run["p95_gap_ms"])
    step = caches["batched_step"]  # one batched decode step alone: only where the decoder can batch
    assert (step is None) == (not caches["batching"])
    # both scheduler policies measured where the decoder batches, in turn; the default is the report's row
    want = {"prefill first", "decode during prefill"} if caches["batching"] else {"no batching"}
    assert set(caches["concurrent_policies"]) == want
    default = "prefill first" if caches["batching"] else "no batching"
    assert caches["concurrent"] == caches["concurrent_policies"][default]
    assert step is None or (step["ratio"] > 0 and len(step["tok_s"]) >= 2)
    assert "Caches and continuous batching" in (out / "summary.md").read_text()
    for name in ("summary.md", "text.csv", "stages.csv", "efficiency.csv"):
        assert (out / name).is_file()
    assert len(list(out.glob("bench_*.png"))) == 3


def test_pipeline_cells_are_sampled_in_interleaved_passes(small_artifacts, capsys) -> None:
    """Each pass takes one sample of every (mode, images) cell, so a slow stretch of the machine
    falls on all modes alike."""
    from maven_edge.benchmarks.worker import PROGRESS, task_pipeline

    job = {"threads": 1, "backend": "ort", "artifacts": str(small_artifacts), "images": [1, 2],
           "modes": ["hybrid", "hybrid-context"], "warmup": 1, "repeats": 2, "new_tokens": 2}
    res = task_pipeline(job)
    labels = [json.loads(line[len(PROGRESS):])["label"] for line in capsys.readouterr().out.splitlines()
              if line.startswith(PROGRESS)]
    runs = [lab for lab in labels if " run " in lab]
    assert runs == [f"{m} x{n} run {r}/2" for r in (1, 2) for m in ("hybrid", "hybrid-context") for n in (1, 2)]
    assert [(c["mode"], c["images"]) for c in res["cells"]] == [("hybrid", 1), ("hybrid", 2), ("hybrid-context", 1),
                                                               ("hybrid-context", 2)]
    assert all(c["stats"]["ttft_ms"]["n"] == 2 for c in res["cells"])


# ---- opt-in: llama.cpp built from source and run on the shipped tiny model (MAVEN_SLOW=1) --------------


@pytest.mark.skipif(not __import__("os").environ.get("MAVEN_SLOW"),
                    reason="opt-in: MAVEN_SLOW=1 (builds llama.cpp from source once: tens of minutes on 2 cores; "
                    "MAVEN_EDGE_LLAMA_CPP_SRC names the sources, else the llama-cpp-python sdist is fetched)")
def test_llama_cpp_mtmd_runs_the_tiny_model(tmp_path) -> None:
    pytest.importorskip("gguf")
    from maven_edge.benchmarks.anchors.llama_cpp import (
        convert_hf_to_gguf,
        convert_mmproj_to_gguf,
        run_llama_bench,
        run_mtmd,
        write_images,
    )
    from maven_edge.benchmarks.anchors.llama_cpp_build import ensure_build
    from maven_edge.core import paths
    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.hf_import import save_hf_llama
    from maven_edge.model_src.resources import shipped_checkpoint

    build = ensure_build(paths.cache_dir("bench"), jobs=2)
    assert build.ok, build.error
    ckpt = shipped_checkpoint("tiny")
    model = load_checkpoint(ckpt)
    hf = save_hf_llama(model.llm, tmp_path / "hf", tokenizer=model.tokenizer)
    text = convert_hf_to_gguf(hf, tmp_path / "text.gguf", "q8_0")
    mmproj = convert_mmproj_to_gguf(ckpt, tmp_path / "mmproj.gguf")
    size = model.config.vision.image_size
    one = run_mtmd(build.tool("llama-mtmd-cli"), text, mmproj, write_images(tmp_path, 1, size), 2, 4)
    two = run_mtmd(build.tool("llama-mtmd-cli"), text, mmproj, write_images(tmp_path, 2, size), 2, 4)
    # every patch of each image is a prompt token (LLaVA-style), so a second image adds num_patches tokens
    assert two.prompt_tokens - one.prompt_tokens == model.config.num_patches
    assert one.ttft_ms > 0 and one.encode_ms > 0 and one.eval_runs >= 1
    pp, tg = run_llama_bench(build.tool("llama-bench"), text, 2, 32, 4)
    assert pp > 0 and tg > 0

"""One benchmark job in its own process: ``python -m maven_edge.benchmarks.worker JOB.json RESULT.json``.

Each engine, backend and probe runs in a fresh process so that its peak resident memory, its
thread pools and its import side effects (torch, onnxruntime, transformers, llama.cpp) are its
own. The parent (:mod:`maven_edge.benchmarks.suite`) writes the job, reads progress lines
(``@@progress {"done": i, "total": n, "label": ...}``) from stdout, and reads the result file.

Jobs (``job["task"]``):

- ``limits``: memory bandwidth and matmul FLOP/s (:mod:`maven_edge.benchmarks.roofline`);
- ``source``: build or load the model, save the maven-edge checkpoint and the HF-format
  decoder checkpoint into the work directory, fingerprint the weights;
- ``export``: export ONNX artifacts of that checkpoint (our exporter), and int4 artifacts when a
  quantizer is available;
- ``text``: one engine x precision under the text protocol (:mod:`maven_edge.benchmarks.anchors.base`);
- ``pipeline``: the multimodal pipeline over a grid of modes x image counts, per-stage timings;
- ``mtmd``: llama.cpp's multimodal CLI on the same geometry (LLaVA-style), per image count.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from maven_edge.benchmarks.harness import PeakRSS, max_rss_bytes, rss_bytes
from maven_edge.core.errors import MavenError
from maven_edge.core.manifest import load_manifest

PROGRESS = "@@progress "


def progress(done: int, total: int, label: str = "") -> None:
    print(PROGRESS + json.dumps({"done": done, "total": total, "label": label}), flush=True)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- tasks ----------------------------------------------------------------------------------------


def task_limits(job: dict[str, Any]) -> dict[str, Any]:
    from maven_edge.benchmarks.roofline import measure_limits

    limits = measure_limits(threads=int(job["threads"]), copy_mb=int(job.get("copy_mb", 256)),
                            matmul_size=int(job.get("matmul_size", 2048)), repeats=int(job.get("repeats", 5)))
    return limits.to_dict()


def _load_source(job: dict[str, Any]) -> Any:
    from maven_edge.model_src.checkpoint import load_model

    return load_model(checkpoint=job.get("checkpoint"), preset=job.get("preset"), overrides=job.get("overrides"),
                      seed=job.get("seed"))


def task_source(job: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint the model; save the checkpoint and/or the HF-format decoder into the work dir
    when asked (``save_checkpoint`` / ``save_hf``); reused when the fingerprint matches."""
    import torch

    from maven_edge.export.onnx_export import model_fingerprint
    from maven_edge.model_src.checkpoint import save_checkpoint
    from maven_edge.model_src.hf_import import save_hf_llama

    torch.set_num_threads(int(job.get("threads", 1)))
    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _load_source(job)
    load_s = time.perf_counter() - t0
    fingerprint = model_fingerprint(model)
    ckpt, hf, stamp = work / "checkpoint", work / "hf", work / "source.json"
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("fingerprint") != fingerprint:
        saved = {"fingerprint": fingerprint}
    if job.get("save_checkpoint") and not saved.get("checkpoint"):
        log(f"saving the checkpoint to {ckpt}")
        save_checkpoint(model, ckpt)
        saved["checkpoint"] = True
    if job.get("save_hf") and not saved.get("hf"):
        log(f"saving the HF-format decoder to {hf}")
        save_hf_llama(model.llm, hf, tokenizer=model.tokenizer)
        # AutoTokenizer (onnxruntime-genai builder, Optimum) must load tokenizer.json as it is.
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.llm.max_position_embeddings,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        }, indent=2))
        saved["hf"] = True
    stamp.write_text(json.dumps(saved))
    cfg = model.config
    return {
        "fingerprint": fingerprint,
        "checkpoint": str(ckpt) if saved.get("checkpoint") else None,
        "hf_dir": str(hf) if saved.get("hf") else None,
        "hf_class": "Qwen2ForCausalLM" if cfg.llm.attention_bias else "LlamaForCausalLM",
        "config": cfg.to_dict(),
        "preset": cfg.name,
        "vocab_size": cfg.vocab_size,
        "tokenizer_size": model.tokenizer.layout.tokenizer_size,
        "llm_params": sum(p.numel() for p in model.llm.parameters()),
        "model_params": sum(p.numel() for p in model.parameters()),
        "build_s": load_s,
    }


def task_export(job: dict[str, Any]) -> dict[str, Any]:
    """Artifacts with our exporter, decoder made by ``decoder`` (torch, genai, genai-int4); reused when
    they hold the same weights and decoder kind, unless ``reexport``."""
    import torch

    from maven_edge.export.onnx_export import ExportOptions, export_model, model_fingerprint

    torch.set_num_threads(int(job.get("threads", 1)))
    out = Path(job["out"])
    fingerprint = job["fingerprint"]
    decoder = job.get("decoder", "torch")
    try:
        manifest = load_manifest(out, verify=False)
        made_with = "torch" if "builder" not in manifest.components["decoder"].extra else (
            "genai-int4" if manifest.components["decoder"].precision == "int4" else "genai")
        if ((manifest.extra or {}).get("model_fingerprint") == fingerprint and made_with == decoder
                and not job.get("reexport")):
            return {"artifacts": str(out), "seconds": 0.0, "cached": True}
    except Exception:  # noqa: BLE001 - anything unusable is re-exported
        pass
    if not job.get("build", True):
        return {"artifacts": None, "seconds": 0.0, "cached": False}
    model = _load_source(job["source"])
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError("the source model does not match the fingerprint it had a moment ago")
    src = job["source"]
    source = ({"kind": "checkpoint", "path": src["checkpoint"], "overrides": src.get("overrides")}
              if src.get("checkpoint") else
              {"kind": "preset", "preset": src.get("preset"), "overrides": src.get("overrides") or [],
               "seed": model.config.seed if src.get("seed") is None else src["seed"]})
    t0 = time.perf_counter()
    export_model(model, ExportOptions(out=out, progress=False, force=True, decoder=decoder), source=source, log=log)
    return {"artifacts": str(out), "seconds": time.perf_counter() - t0, "cached": False}


def task_quantize(job: dict[str, Any]) -> dict[str, Any]:
    """Quantized artifacts (``recipe``, default int4-weight) from fp32 ones, through the project's quantizer."""
    from maven_edge.benchmarks.quantize import quantize_recipe

    t0 = time.perf_counter()
    out = quantize_recipe(job["fp32"], job["out"], job.get("recipe", "int4-weight"), log=log,
                          force=bool(job.get("force")))
    return {"artifacts": str(out), "seconds": time.perf_counter() - t0}


def task_text(job: dict[str, Any]) -> dict[str, Any]:
    from maven_edge.benchmarks.anchors import EngineContext, TextSpec, make_engine
    from maven_edge.benchmarks.harness import summarize_records

    c = job["ctx"]
    ctx = EngineContext(work_dir=Path(c["work_dir"]), hf_dir=Path(c["hf_dir"]) if c.get("hf_dir") else None,
                        checkpoint=Path(c["checkpoint"]) if c.get("checkpoint") else None,
                        artifacts=dict(c.get("artifacts", {})), threads=int(c["threads"]), log=log,
                        extra=dict(c.get("extra", {})))
    spec = TextSpec(**job["spec"])
    engine = make_engine(job["engine"], ctx, job["precision"])
    why = engine.unavailable()
    if why:
        return {"status": "unavailable", "reason": why, "reference": engine.reference(), **engine.describe()}
    total = spec.warmup + spec.repeats + 2
    progress(0, total, "prepare")
    t0 = time.perf_counter()
    prepared = engine.prepare()
    if job.get("prepare_only"):
        return {"status": "prepared", "reason": f"prepared in {time.perf_counter() - t0:.0f} s (--prepare-only)",
                **engine.describe(), "prepared": {"path": prepared.path, "bytes": prepared.bytes}}
    progress(1, total, "load")
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    engine.load(prepared)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    runs = []
    with PeakRSS() as mem:
        for i in range(spec.warmup + spec.repeats):
            label = f"warm-up {i + 1}" if i < spec.warmup else f"run {i - spec.warmup + 1}/{spec.repeats}"
            progress(2 + i, total, label)
            runs.append(engine.generate(spec))
    progress(total, total, "done")
    counted = runs[spec.warmup:]
    stats = summarize_records([r.record() for r in counted])
    return {
        "status": "measured",
        **engine.describe(),
        "prepared": {"path": prepared.path, "bytes": prepared.bytes, "build_s": prepared.seconds,
                     "cached": prepared.cached, **prepared.details},
        "load_s": load_s,
        "rss_before_load_mb": rss0 / 1e6,
        "rss_loaded_mb": rss_loaded / 1e6,
        "peak_rss_mb": max(mem.peak_bytes, max_rss_bytes()) / 1e6,
        "stats": {k: v.to_dict() for k, v in stats.items()},
        "tokens": counted[0].tokens,
        "new_tokens": [len(r.tokens) for r in counted],
    }


def synthetic_images(n: int, size: int, seed: int) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def pipeline_prompt(n: int) -> str:
    return "<image>" * n + "\nQuestion: what is in the images?\nAnswer:"


#: pipeline-section modes beside the visual modes: (visual mode, generate options)
PIPELINE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hybrid-context": ("hybrid", {"h_eos": "context"}),  # h_eos read inside the prefill (docs/design.md §5.2)
}


def task_pipeline(job: dict[str, Any]) -> dict[str, Any]:
    """Per-stage timings of the multimodal pipeline over modes x image counts."""
    from maven_edge.benchmarks.harness import summarize_records
    from maven_edge.runtime.options import NO_CACHING, PipelineLimits
    from maven_edge.runtime.pipeline import STAGES, MavenPipeline

    threads = int(job["threads"])
    backend = job["backend"]
    t0 = time.perf_counter()
    rss0 = rss_bytes()
    if backend == "torch":
        from maven_edge.benchmarks.anchors.base import set_torch_threads

        set_torch_threads(threads)
        if job.get("checkpoint"):
            pipe = MavenPipeline.from_checkpoint(job["checkpoint"], caching=NO_CACHING)
        else:  # seeded preset: rebuilt here rather than saved (paper geometry is several GB)
            pipe = MavenPipeline.from_model(_load_source(job["source"]), caching=NO_CACHING)
    else:
        from maven_edge.runtime.backends.ort_backend import SessionConfig

        pipe = MavenPipeline.from_artifacts(job["artifacts"], backend=backend,
                                            session_options=SessionConfig(intra_op_num_threads=threads,
                                                                          inter_op_num_threads=1,
                                                                          extra_config=dict(job.get("ort_config") or {})),
                                            caching=NO_CACHING)  # every stage measured, every time
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    cfg = pipe.config
    max_images = max(job["images"])
    pipe.limits = PipelineLimits(max_images=max(max_images, pipe.limits.max_images))
    size = cfg.preprocess.image_size
    warmup, repeats = int(job["warmup"]), int(job["repeats"])
    cells = [(m, n) for m in job["modes"] for n in job["images"]]
    total = len(cells) * repeats + warmup * len(job["modes"])
    done = 0
    results = []
    available: list[str] = []
    records: dict[tuple[str, int], list[dict[str, float]]] = {}
    meta: dict[tuple[str, int], dict[str, Any]] = {}
    unavailable: dict[str, str] = {}

    def measure(label: str, n: int, r: int) -> None:
        mode, how = PIPELINE_VARIANTS.get(label, (label, {}))
        res = pipe.generate(synthetic_images(n, size, job.get("seed", 0) + r), pipeline_prompt(n),
                            max_new_tokens=job["new_tokens"], mode=mode, **how)
        t = res.timings
        steps = t.decode_step_ms
        rec = {f"{s}_ms": getattr(t, f"{s}_ms") for s in STAGES}
        rec.update({"ttft_ms": t.ttft_ms, "total_ms": t.total_ms,
                    "decode_step_ms": (sum(steps) / len(steps)) if steps else float("nan"),
                    "visual_ms": sum(getattr(t, f"{s}_ms") for s in ("preprocess", "vision", "discrete", "h_eos", "selector"))})
        records.setdefault((label, n), []).append(rec)
        meta[(label, n)] = {"prompt_tokens": res.prompt_tokens, "visual_tokens_per_image": res.visual_tokens_per_image[0]
                            if res.visual_tokens_per_image else 0, "new_tokens": len(res.token_ids),
                            "finish_reason": res.finish_reason}

    with PeakRSS() as mem:
        for label in job["modes"]:
            mode, how = PIPELINE_VARIANTS.get(label, (label, {}))
            try:
                for _ in range(warmup):  # one-time costs (arena growth, thread pools) per mode
                    progress(done, total, f"{label} warm-up")
                    pipe.generate(synthetic_images(1, size, 99), pipeline_prompt(1), max_new_tokens=job["new_tokens"],
                                  mode=mode, **how)
                    done += 1
                available.append(label)
            except MavenError as exc:
                unavailable[label] = str(exc)
                done += repeats * len(job["images"])
        # repeats are the outer loop: every cell's k-th sample is taken in the same pass, so a stretch
        # in which the machine runs slower (another tenant, clocks) touches every mode alike and the
        # medians' ratios stay fair
        for r in range(repeats):
            for label in available:
                for n in job["images"]:
                    progress(done, total, f"{label} x{n} run {r + 1}/{repeats}")
                    measure(label, n, r)
                    done += 1
    for label in job["modes"]:
        for n in job["images"]:
            if label in unavailable:
                results.append({"mode": label, "images": n, "status": "unavailable", "reason": unavailable[label]})
            else:
                stats = summarize_records(records[(label, n)])
                results.append({"mode": label, "images": n, "status": "measured", **meta[(label, n)],
                                "stats": {k: v.to_dict() for k, v in stats.items()}})
    progress(total, total, "done")
    return {
        "backend": backend,
        "describe": pipe.backend.describe(),
        "load_s": load_s,
        "rss_before_load_mb": rss0 / 1e6,
        "rss_loaded_mb": rss_loaded / 1e6,
        "peak_rss_mb": max(mem.peak_bytes, max_rss_bytes()) / 1e6,
        "cells": results,
    }


def task_mtmd(job: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's multimodal runtime (llama-mtmd-cli) on a LLaVA-style model of the same geometry:
    our text decoder as a GGUF at ``precision`` + our ViT and projector as an f32 mmproj; time to
    first token per image count, plus its prefill and decode speed."""
    from maven_edge.benchmarks.anchors.llama_cpp import (
        ensure_mmproj_gguf,
        ensure_text_gguf,
        run_mtmd,
        write_images,
    )
    from maven_edge.benchmarks.harness import summarize_records

    work, bin_dir = Path(job["work_dir"]), Path(job["bin_dir"])
    t0 = time.perf_counter()
    text, text_s, _ = ensure_text_gguf(work, Path(job["hf_dir"]), job["precision"], log)
    mmproj, mm_s, _ = ensure_mmproj_gguf(work, Path(job["checkpoint"]), log)
    prepare_s = time.perf_counter() - t0
    binary = bin_dir / "llama-mtmd-cli"
    threads, new_tokens = int(job["threads"]), int(job["new_tokens"])
    warmup, repeats = int(job["warmup"]), int(job["repeats"])
    size = int(job["image_size"])
    img_dir = work / "mtmd-images"
    total = warmup + repeats * len(job["images"])
    done = 0
    for _ in range(warmup):  # page cache, first-touch allocations
        progress(done, total, "warm-up")
        run_mtmd(binary, text, mmproj, write_images(img_dir, 1, size, 99), threads, new_tokens)
        done += 1
    cells = []
    for n in job["images"]:
        records, prompt_tokens = [], 0
        for r in range(repeats):
            progress(done, total, f"x{n} run {r + 1}/{repeats}")
            run = run_mtmd(binary, text, mmproj, write_images(img_dir, n, size, r), threads, new_tokens)
            records.append(run.record())
            prompt_tokens = run.prompt_tokens
            done += 1
        stats = summarize_records(records)
        cells.append({"images": n, "status": "measured", "prompt_tokens": prompt_tokens,
                      "stats": {k: v.to_dict() for k, v in stats.items()}})
    progress(total, total, "done")
    return {"precision": job["precision"], "text_gguf": str(text), "text_gguf_bytes": text.stat().st_size,
            "mmproj": str(mmproj), "mmproj_bytes": mmproj.stat().st_size, "convert_s": text_s + mm_s,
            "prepare_s": prepare_s, "cells": cells}


def task_caches(job: dict[str, Any]) -> dict[str, Any]:
    """Caches and continuous batching on one artifact set (benchmarks.caches)."""
    from maven_edge.benchmarks.caches import measure

    return measure(job["artifacts"], int(job["threads"]), images=int(job["images"]), new_tokens=int(job["new_tokens"]),
                   repeats=int(job["repeats"]), progress=progress)


TASKS = {"caches": task_caches, "limits": task_limits, "source": task_source, "export": task_export,
         "quantize": task_quantize, "text": task_text, "pipeline": task_pipeline, "mtmd": task_mtmd}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = {"ok": True, "result": TASKS[job["task"]](job)}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_path.write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a decode step's time goes: ONNX Runtime's profiler over one decoder file, by op type.

    python -m maven_edge.benchmarks.profile_decode artifacts/bench-cache/<model>/onnx-fp32/decoder.onnx \\
        artifacts/bench-cache/<model>/genai-fp32/model.onnx --past 288 --steps 16 --threads 2

For each decoder (ours: ``inputs_embeds`` in; onnxruntime-genai's: ``input_ids`` in), it builds
an InferenceSession with profiling on, runs ``--steps`` single-token steps with a KV cache of
``--past`` positions (plain ``run`` with numpy feeds, the same loop for every file, so the graph
is what differs), and prints per-step time, kernel launches per step and the time per op type.
The op mix shows the cause of a gap: unfused attention (MatMul + Softmax + Transpose + Concat
+ Expand per layer, the whole KV cache copied by Concat every step) vs ``GroupQueryAttention``,
or decomposed RMSNorm / rotary vs ``SkipSimplifiedLayerNormalization`` / fused rotary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _feeds(sess: Any, past: int, step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        shape = i.shape
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 200, size=(1, 1), dtype=np.int64)
        elif i.name == "inputs_embeds":
            feeds[i.name] = (rng.standard_normal((1, 1, int(shape[-1]))) * 0.02).astype(np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + step + 1), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.array([[past + step]], dtype=np.int64)
        elif i.name.startswith("past_key_values."):
            kv, hd = int(shape[1]), int(shape[3])
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((1, kv, past + step, hd), dtype=dtype)
        else:
            raise ValueError(f"unexpected decoder input {i.name} {i.type} {shape}")
    return feeds


def profile(path: str | Path, past: int = 256, steps: int = 16, threads: int = 1, warmup: int = 3) -> dict[str, Any]:
    """Per-step time and per-op-type totals of ``steps`` single-token steps at ``past`` cached positions."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = [_feeds(plain, past, s, rng) for s in range(steps)]
        for f in feeds[:warmup]:
            plain.run(["logits"], f)
        t0 = time.perf_counter()
        for f in feeds:
            plain.run(["logits"], f)
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        del plain
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for f in feeds[:warmup]:
            sess.run(["logits"], f)
        for f in feeds:
            sess.run(["logits"], f)
        prof = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    runs = [e for e in prof if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in prof:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            calls[op] += 1
    n_runs = max(1, len(runs))
    total = sum(by_op.values())
    ops = sorted(by_op, key=by_op.get, reverse=True)  # type: ignore[arg-type]
    return {
        "file": str(path),
        "past": past,
        "threads": threads,
        "step_ms": step_ms,
        "kernels_per_step": sum(calls.values()) / n_runs,
        "kernel_ms_per_step": total / n_runs / 1e3,
        "ops": [{"op": op, "ms_per_step": by_op[op] / n_runs / 1e3, "share": by_op[op] / total if total else 0.0,
                 "calls_per_step": calls[op] / n_runs} for op in ops],
    }


def format_profile(p: dict[str, Any], top: int = 12) -> str:
    lines = [f"{p['file']}: {p['step_ms']:.2f} ms/step (past {p['past']}, {p['threads']} threads), "
             f"{p['kernels_per_step']:.0f} kernels/step, {p['kernel_ms_per_step']:.2f} ms in kernels"]
    for o in p["ops"][:top]:
        lines.append(f"  {o['op']:<36} {o['ms_per_step']:8.3f} ms  {100 * o['share']:5.1f}%  "
                     f"{o['calls_per_step']:6.0f} calls")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("decoders", nargs="+", help="decoder ONNX files")
    ap.add_argument("--past", type=int, default=288)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the profiles here")
    args = ap.parse_args(argv)
    out = []
    for d in args.decoders:
        p = profile(d, args.past, args.steps, args.threads)
        out.append(p)
        print(format_profile(p))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

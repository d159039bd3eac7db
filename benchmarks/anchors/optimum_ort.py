"""Anchor: Hugging Face Optimum's ``ORTModelForCausalLM`` (package ``optimum-onnx``), fp32.

The HF-format checkpoint of our decoder is exported with the stock command
``optimum-cli export onnx --task text-generation-with-past`` (run in a child process), loaded
with ``ORTModelForCausalLM.from_pretrained(..., session_options=...)`` on the CPU execution
provider with the benchmark's thread count, and driven by ``generate()`` exactly like the
transformers anchor: the ONNX Runtime path most Hugging Face users would try first.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    TextRun,
    TextSpec,
    dir_bytes,
    hf_generate_run,
    set_torch_threads,
    stamp_ok,
    write_stamp,
)
from maven_edge.core.errors import BackendError


def export_optimum(hf_dir: Path, out: Path, timeout_s: float = 3600) -> float:
    """``optimum-cli export onnx --task text-generation-with-past``; returns the seconds it took."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf_dir),
           "--task", "text-generation-with-past", str(out)]
    t0 = time.perf_counter()
    with open(out / "export.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (out / "export.log").read_text(errors="replace")[-1500:]
        raise BackendError(f"optimum-cli export onnx failed ({proc.returncode}); log tail:\n{tail}")
    return time.perf_counter() - t0


class OptimumORTEngine(Engine):
    name = "optimum"
    label = "Optimum ORTModelForCausalLM"
    precisions = ("fp32",)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None:
            return "optimum-onnx is not installed (pip install optimum-onnx)"
        if self.ctx.hf_dir is None:
            return "no HF-format checkpoint of the decoder (needs the source model)"
        return None

    def prepare(self) -> Prepared:
        assert self.ctx.hf_dir is not None
        out = self.ctx.work_dir / "optimum-fp32"
        key = {"engine": self.name, "precision": self.precision, "hf": str(self.ctx.hf_dir),
               "task": "text-generation-with-past"}
        seconds, cached = 0.0, stamp_ok(out, key)
        if not cached:
            self.ctx.say(f"exporting with optimum-cli into {out}")
            seconds = export_optimum(self.ctx.hf_dir, out)
            write_stamp(out, key)
        return Prepared(path=str(out), bytes=dir_bytes(out, "model.onnx*"), seconds=seconds, cached=cached)

    def load(self, prepared: Prepared) -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        set_torch_threads(self.ctx.threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.ctx.threads
        so.inter_op_num_threads = 1
        self.model: Any = ORTModelForCausalLM.from_pretrained(
            prepared.path, provider="CPUExecutionProvider", session_options=so)

    def generate(self, spec: TextSpec) -> TextRun:
        return hf_generate_run(self.model, spec)

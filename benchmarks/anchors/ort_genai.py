"""Anchor: onnxruntime-genai, its model builder and its generation loop (fp32 and int4).

The builder (``python -m onnxruntime_genai.models.builder``) turns the HF-format checkpoint of
our decoder into a decoder with fused ``GroupQueryAttention`` (past and present sharing one
preallocated buffer), fused rotary embedding and ``SkipSimplifiedLayerNormalization``; int4 is
``MatMulNBits`` with block 32 and accuracy level 4 (int8 activations), the builder's CPU
default. Text-only generation runs through ``og.Generator``: ``append_tokens`` (prefill) and
``generate_next_token`` steps, greedy, with ``min_length`` so that end-of-sequence never stops
it early. The intra-op thread count is written into ``genai_config.json``.

The builder runs in a child process (it imports torch and transformers and needs a few GB for
the edge-small checkpoint); its log goes to ``build.log`` beside the model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    StepClock,
    TextRun,
    TextSpec,
    dir_bytes,
    stamp_ok,
    write_stamp,
)
from maven_edge.core.errors import BackendError

#: Builder arguments per precision (the CPU recipe the issue's reference figures used).
BUILD_ARGS = {
    "fp32": ["-p", "fp32"],
    "int4": ["-p", "int4", "--extra_options", "int4_block_size=32", "int4_accuracy_level=4"],
}


def build_genai_model(hf_dir: Path, out: Path, precision: str, extra_options: list[str] | None = None,
                      timeout_s: float = 3600) -> float:
    """Run the onnxruntime-genai model builder; return the seconds it took."""
    args = list(BUILD_ARGS[precision])
    if extra_options:
        if "--extra_options" not in args:
            args.append("--extra_options")
        args += extra_options
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-e", "cpu",
           "-c", str(out / "cache"), *args]
    t0 = time.perf_counter()
    with open(out / "build.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (out / "build.log").read_text(errors="replace")[-1500:]
        raise BackendError(f"the onnxruntime-genai builder failed ({proc.returncode}); log tail:\n{tail}")
    import shutil

    shutil.rmtree(out / "cache", ignore_errors=True)
    return time.perf_counter() - t0


def set_genai_threads(model_dir: Path, threads: int) -> None:
    """Write the intra-op thread count into genai_config.json (the decoder's session options)."""
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = int(threads)
    so["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=4))


class GenAIEngine(Engine):
    name = "genai"
    label = "onnxruntime-genai"
    precisions = ("fp32", "int4")

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed (pip install onnxruntime-genai onnx-ir)"
        if importlib.util.find_spec("onnx_ir") is None:
            return "onnx-ir is not installed (the onnxruntime-genai model builder needs it)"
        if self.ctx.hf_dir is None:
            return "no HF-format checkpoint of the decoder (needs the source model)"
        return None

    def prepare(self) -> Prepared:
        assert self.ctx.hf_dir is not None
        out = self.ctx.work_dir / f"genai-{self.precision}"
        key = {"engine": self.name, "precision": self.precision, "hf": str(self.ctx.hf_dir), "args": BUILD_ARGS[self.precision]}
        seconds, cached = 0.0, stamp_ok(out, key)
        if not cached:
            self.ctx.say(f"building onnxruntime-genai {self.precision} model in {out}")
            seconds = build_genai_model(self.ctx.hf_dir, out, self.precision)
            write_stamp(out, key)
        return Prepared(path=str(out), bytes=dir_bytes(out, "model.onnx*"), seconds=seconds, cached=cached)

    def load(self, prepared: Prepared) -> None:
        import onnxruntime_genai as og

        set_genai_threads(Path(prepared.path), self.ctx.threads)
        self.og = og
        self.model: Any = og.Model(prepared.path)

    def generate(self, spec: TextSpec) -> TextRun:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=spec.max_length, min_length=spec.max_length, do_sample=False)
        gen = og.Generator(self.model, params)
        ids = spec.prompt_ids().astype("int32")
        clock = StepClock()
        tokens: list[int] = []
        clock.start()
        gen.append_tokens(ids)  # prefill: computes the logits of the last prompt position
        while not gen.is_done() and len(tokens) < spec.new_tokens:
            gen.generate_next_token()  # the first call samples from the prefill logits
            tokens.append(int(gen.get_next_tokens()[0]))
            if len(tokens) == 1:
                clock.first()
            else:
                clock.last()
        del gen
        return clock.run(tokens)

"""Our own engines under the common text protocol: the ONNX Runtime backend and the torch backend.

Both run the text-only part through the same backend methods the multimodal pipeline uses
(``embed`` -> ``prefill`` -> ``decode`` per token, the KV cache kept inside the backend), greedy
on the full logits, so the numbers are the runtime's own decode loop and compare one to one
with the anchors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    StepClock,
    TextRun,
    TextSpec,
    argmax,
    dir_bytes,
)


def decoder_bytes(artifacts: str | Path) -> int:
    """Bytes of the decoder (+ embeddings) files in an artifacts directory."""
    root = Path(artifacts)
    return sum(f.stat().st_size for f in root.iterdir()
               if f.is_file() and f.name.startswith(("decoder", "embed_tokens")))


def backend_generate(be: Any, spec: TextSpec) -> TextRun:
    ids = spec.prompt_ids()[None]
    clock = StepClock()
    tokens: list[int] = []
    clock.start()
    logits, state = be.prefill(be.embed(ids).astype(np.float32, copy=False), spec.max_length)
    tokens.append(argmax(logits))
    clock.first()
    try:
        while len(tokens) < spec.new_tokens:
            logits = be.decode(state, tokens[-1])
            tokens.append(argmax(logits))
        clock.last()
    finally:
        state.release()
    return clock.run(tokens)


class MavenOrtEngine(Engine):
    name = "ort"
    label = "maven-edge ORT"
    precisions = ("fp32", "int4", "int8", "int8-dynamic", "fp16", "fp32-dynamo")
    ours = True

    def unavailable(self) -> str | None:
        if self.precision not in self.ctx.artifacts:
            return f"no {self.precision} artifacts (export / quantize them, or pass --artifacts)"
        return None

    def prepare(self) -> Prepared:
        path = self.ctx.artifacts[self.precision]
        return Prepared(path=path, bytes=decoder_bytes(path), seconds=0.0, cached=True,
                        details={"all_files_bytes": dir_bytes(path, "*.onnx*")})

    def load(self, prepared: Prepared) -> None:
        from maven_edge.runtime.backends.ort_backend import OrtBackend, SessionConfig

        self.be = OrtBackend(prepared.path, session_options=SessionConfig(
            intra_op_num_threads=self.ctx.threads, inter_op_num_threads=1,
            extra_config=dict(self.ctx.extra.get("ort_config") or {})))

    def generate(self, spec: TextSpec) -> TextRun:
        return backend_generate(self.be, spec)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if hasattr(self, "be"):
            d.update({k: v for k, v in self.be.describe().items() if k in ("kv_cache", "recipe", "providers")})
        return d


class MavenTorchEngine(Engine):
    name = "torch"
    label = "maven-edge torch (eager)"
    precisions = ("fp32",)
    ours = True

    def unavailable(self) -> str | None:
        if self.ctx.checkpoint is None:
            return "no maven-edge checkpoint (needs the source model)"
        return None

    def prepare(self) -> Prepared:
        assert self.ctx.checkpoint is not None
        return Prepared(path=str(self.ctx.checkpoint), bytes=dir_bytes(self.ctx.checkpoint, "*.safetensors"),
                        seconds=0.0, cached=True)

    def load(self, prepared: Prepared) -> None:
        from maven_edge.benchmarks.anchors.base import set_torch_threads
        from maven_edge.runtime.backends.torch_backend import TorchBackend

        set_torch_threads(self.ctx.threads)
        self.be = TorchBackend.from_checkpoint(prepared.path)

    def generate(self, spec: TextSpec) -> TextRun:
        return backend_generate(self.be, spec)

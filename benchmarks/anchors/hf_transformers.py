"""Anchor: Hugging Face `transformers` ``generate()`` with its KV cache, eager PyTorch, fp32.

Runs the HF-format checkpoint of our decoder (``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` when
the decoder has q/k/v biases, written by :func:`maven_edge.model_src.hf_import.save_hf_llama`) through the
stock generation loop: what a user gets from ``AutoModelForCausalLM.from_pretrained(...).generate``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from maven_edge.benchmarks.anchors.base import (
    Engine,
    Prepared,
    TextRun,
    TextSpec,
    dir_bytes,
    hf_generate_run,
    set_torch_threads,
)


class HFTransformersEngine(Engine):
    name = "hf"
    label = "HF transformers generate"
    precisions = ("fp32",)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed"
        if self.ctx.hf_dir is None:
            return "no HF-format checkpoint of the decoder (needs the source model)"
        return None

    def prepare(self) -> Prepared:
        assert self.ctx.hf_dir is not None
        return Prepared(path=str(self.ctx.hf_dir), bytes=dir_bytes(self.ctx.hf_dir, "*.safetensors"), seconds=0.0,
                        cached=True)

    def load(self, prepared: Prepared) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        set_torch_threads(self.ctx.threads)
        self.model: Any = AutoModelForCausalLM.from_pretrained(prepared.path, dtype=torch.float32).eval()
        self.attn = getattr(self.model.config, "_attn_implementation", None)

    def generate(self, spec: TextSpec) -> TextRun:
        return hf_generate_run(self.model, spec)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["attention"] = getattr(self, "attn", None)
        return d

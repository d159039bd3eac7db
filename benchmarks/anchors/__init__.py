"""Engines measured under one text-generation protocol (see :mod:`maven_edge.benchmarks.anchors.base`).

Ours: ``ort`` (the ONNX Runtime backend over exported artifacts) and ``torch`` (eager reference).
Anchors, the tools a user would pick instead: ``hf`` (transformers generate), ``genai``
(onnxruntime-genai), ``optimum`` (Optimum ORTModelForCausalLM), ``llamacpp`` (llama.cpp via
llama-cpp-python). Nothing heavy is imported until an engine is loaded.
"""

from __future__ import annotations

import importlib

from maven_edge.benchmarks.anchors.base import Engine, EngineContext, TextRun, TextSpec
from maven_edge.core.errors import InputError

#: name -> (module, class, precisions measured by default)
ENGINES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ort": ("maven_edge.benchmarks.anchors.maven", "MavenOrtEngine", ("fp32", "int4")),
    "torch": ("maven_edge.benchmarks.anchors.maven", "MavenTorchEngine", ("fp32",)),
    "hf": ("maven_edge.benchmarks.anchors.hf_transformers", "HFTransformersEngine", ("fp32",)),
    "genai": ("maven_edge.benchmarks.anchors.ort_genai", "GenAIEngine", ("fp32", "int4")),
    "optimum": ("maven_edge.benchmarks.anchors.optimum_ort", "OptimumORTEngine", ("fp32",)),
    "llamacpp": ("maven_edge.benchmarks.anchors.llama_cpp", "LlamaCppEngine", ("fp32", "q8_0", "q4_0")),
}
OURS = ("ort", "torch")
ANCHORS = ("hf", "genai", "optimum", "llamacpp")

__all__ = ["ANCHORS", "ENGINES", "OURS", "Engine", "EngineContext", "TextRun", "TextSpec", "engine_class",
           "make_engine"]


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    module, cls, _ = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, ctx: EngineContext, precision: str) -> Engine:
    return engine_class(name)(ctx, precision)

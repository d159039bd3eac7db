"""Backends: one table, :data:`BACKENDS`, name -> what it runs and how it is built.

| name  | runs        | module             |
|-------|-------------|--------------------|
| torch | checkpoint  | torch_backend.py   | the PyTorch reference (imports torch)
| ort   | artifacts   | ort_backend.py     | ONNX Runtime, execution providers from providers.PROVIDERS
| trt   | artifacts   | trt_backend.py     | TensorRT engines from `maven-edge build-trt`

A backend module is imported only when its backend is asked for, so ``backend="ort"`` never
imports torch. Adding a backend: a module with a :class:`Backend` subclass that implements
``from_options(options)``, plus one ``BACKENDS.add`` line here; the CLI's ``--backend`` choices
and help come from this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maven_edge.core.errors import BackendError
from maven_edge.core.registry import Registry
from maven_edge.runtime.backends.base import Backend, DecodeState, SelectorOutput

if TYPE_CHECKING:
    from maven_edge.runtime.options import PipelineOptions


@dataclass(frozen=True)
class BackendSpec:
    runs: str  # "checkpoint" or "artifacts": what --checkpoint / --artifacts it needs
    module: str  # the module holding `cls`, imported on first use
    cls: str
    help: str
    needs: str = ""  # what to install when the module cannot be imported

    def load(self) -> type[Backend]:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise BackendError(f"this backend cannot be imported here ({exc}); {self.needs}") from None
        return getattr(module, self.cls)


BACKENDS: Registry[BackendSpec] = Registry("backend")
BACKENDS.add("torch", BackendSpec(
    "checkpoint", "maven_edge.runtime.backends.torch_backend", "TorchBackend",
    "the PyTorch reference over a checkpoint (imports torch)",
    "it needs PyTorch: install the full maven-edge package, or run exported artifacts with --backend ort"))
BACKENDS.add("ort", BackendSpec(
    "artifacts", "maven_edge.runtime.backends.ort_backend", "OrtBackend",
    "ONNX Runtime over exported artifacts (CPU, CUDA or TensorRT execution providers)",
    "install onnxruntime (or onnxruntime-gpu)"))
BACKENDS.add("trt", BackendSpec(
    "artifacts", "maven_edge.runtime.backends.trt_backend", "TrtBackend",
    "TensorRT engines written by `maven-edge build-trt` (NVIDIA GPU)",
    "install maven-edge[tensorrt] on a machine with an NVIDIA GPU"))

__all__ = ["BACKENDS", "Backend", "BackendSpec", "DecodeState", "SelectorOutput", "load_backend"]


def load_backend(options: PipelineOptions) -> Backend:
    """The backend `options` ask for (see :class:`maven_edge.runtime.options.PipelineOptions`)."""
    return BACKENDS.get(options.backend_name()).load().from_options(options)

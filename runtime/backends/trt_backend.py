"""The TensorRT backend (``--backend trt``): serialized TensorRT engines built from the artifacts.

This is the module boundary; the engines themselves (``maven-edge build-trt``) and their
execution are the TensorRT work of issue 7. Until then, and on any machine without the
``tensorrt`` Python package and a GPU, asking for this backend raises a BackendError that says
what to do. ONNX Runtime's TensorRT execution provider (``--backend ort --provider tensorrt``)
is the supported way to run TensorRT today.

torch-free: ``tensorrt`` is imported only when the backend is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_src.errors import BackendError
from runtime.backends.base import Backend


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails to load its libraries
        return None
    import tensorrt as trt

    return str(getattr(trt, "__version__", "unknown"))


class TrtBackend(Backend):
    name = "trt"
    thread_safe = False  # one IExecutionContext: the pipeline serialises its stage calls

    @classmethod
    def from_artifacts(cls, artifacts: str | Path, verify: bool = True, **kwargs: Any) -> TrtBackend:
        version = tensorrt_version()
        if version is None:
            raise BackendError(
                "the trt backend needs TensorRT, which is not installed here (pip install 'maven-edge[tensorrt]' "
                "on a machine with an NVIDIA GPU); or run the artifacts with --backend ort "
                "(--provider tensorrt uses TensorRT through onnxruntime-gpu)"
            )
        raise BackendError(
            f"TensorRT {version} is installed, but this maven-edge has no TensorRT engine runner yet; run the "
            "artifacts with --backend ort --provider tensorrt (TensorRT through onnxruntime-gpu) instead"
        )

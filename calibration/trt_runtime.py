"""TensorRT and CUDA access shared by the engine builder (:mod:`.tensorrt`) and the trt backend.

The engine directory's format (``engines.json``), importing ``tensorrt`` with a clear error, and
the few CUDA runtime calls (cuda-python) that calibration buffers and engine execution need.
torch-free; ``tensorrt`` and cuda-python are imported only when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maven_edge.core.errors import BackendError

ENGINES_JSON = "engines.json"
ENGINES_FORMAT = 1
MIN_ALLOC = 256  # bytes: every tensor gets a real (non-null) address, empty ones too


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails to load its libraries
        return None
    import tensorrt as trt

    return str(getattr(trt, "__version__", "unknown"))


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or missing libnvinfer
        raise BackendError(
            "TensorRT is not available on this machine (the tensorrt Python package cannot be imported: "
            f"{exc}); install it with pip install 'maven-edge[tensorrt]' (JetPack ships it on Jetson) on a machine "
            "with an NVIDIA GPU, or run the ONNX artifacts with --backend ort (--provider tensorrt uses TensorRT "
            "through onnxruntime-gpu)"
        ) from None
    return trt


# ---- CUDA runtime (cuda-python) ---------------------------------------------------------------------


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(
                "TensorRT engines need cuda-python for device memory (pip install cuda-python, matching the "
                "CUDA major version of the driver); or run the ONNX artifacts with --backend ort"
            ) from None
    return cudart


class Cuda:
    """The few CUDA runtime calls the engines need: memory, copies, one stream, device facts."""

    def __init__(self, device_id: int = 0):
        self.rt = _import_cudart()
        count = self._check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count < 1 or device_id >= count:
            raise BackendError(f"no CUDA GPU {device_id} on this machine ({count} found); TensorRT needs one")
        self._check(self.rt.cudaSetDevice(device_id), "cudaSetDevice")
        self.device_id = device_id
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise BackendError(f"CUDA call {what} failed: {name}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def properties(self) -> dict[str, Any]:
        p = self._check(self.rt.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        name = p.name.decode(errors="replace") if isinstance(p.name, bytes) else str(p.name)
        return {"name": name.split("\x00", 1)[0].strip(), "compute_capability": f"{p.major}.{p.minor}",
                "total_memory_bytes": int(p.totalGlobalMem), "integrated": bool(getattr(p, "integrated", 0))}

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), MIN_ALLOC)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        if ptr:
            self.rt.cudaFree(ptr)

    def htod(self, dst: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, self.stream), "cudaMemcpyAsync")
            self.sync()  # `arr` is pageable host memory that may go away after we return

    def dtoh(self, out: np.ndarray, src: int, offset_bytes: int = 0) -> np.ndarray:
        if out.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self.rt.cudaMemcpyAsync(out.ctypes.data, src + offset_bytes, out.nbytes, kind, self.stream),
                        "cudaMemcpyAsync")
            self.sync()
        return out

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None

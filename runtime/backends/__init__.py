"""Backends: torch (reference, from a checkpoint), ort (onnxruntime), trt (TensorRT engines).

Only :func:`load_backend` is imported eagerly; each backend module is imported when asked
for, so ``backend="ort"`` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_src.errors import BackendError, InputError
from runtime.backends.base import Backend, DecodeState, SelectorOutput

BACKENDS = ("torch", "ort", "trt")

__all__ = ["BACKENDS", "Backend", "DecodeState", "SelectorOutput", "load_backend"]


def load_backend(
    name: str,
    *,
    artifacts: str | Path | None = None,
    checkpoint: str | Path | None = None,
    providers: Any = None,
    session_options: Any = None,
    verify: bool = True,
    device: str = "cpu",
    **kwargs: Any,
) -> Backend:
    """A backend by name. torch needs `checkpoint`; ort and trt need `artifacts`."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        if checkpoint is None:
            raise InputError(
                "the torch backend runs a checkpoint: give --checkpoint DIR (exported artifacts run with "
                "--backend ort or trt)"
            )
        try:
            from runtime.backends.torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendError(
                f"the torch backend needs PyTorch, which cannot be imported here ({exc}); install the full "
                "maven-edge package, or run exported artifacts with --backend ort"
            ) from None
        return TorchBackend.from_checkpoint(checkpoint, device=device)
    if artifacts is None:
        raise InputError(
            f"the {name} backend runs exported artifacts: give --artifacts DIR (a checkpoint runs with "
            "--backend torch)"
        )
    if name == "ort":
        from runtime.backends.ort_backend import OrtBackend

        return OrtBackend(artifacts, providers=providers, session_options=session_options, verify=verify,
                          **kwargs)
    from runtime.backends.trt_backend import TrtBackend

    return TrtBackend.from_artifacts(artifacts, verify=verify, **kwargs)

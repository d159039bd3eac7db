"""Quantized artifacts for the benchmark: the project's own recipes on the fp32 export.

``int4-weight`` is what ``maven-edge quantize --recipe int4-weight`` applies (MatMulNBits, block 32,
accuracy level 4 = int8 compute on CPU, LM head included), i.e. the settings of the
onnxruntime-genai int4 anchor, so the two int4 decoders compare like for like; the other weight-only
recipes (``int8-weight``, ``latency-int4``) use the same settings (block 32, as llama.cpp's Q8_0/Q4_0
blocks). Reused when made from this very fp32 export (its manifest's sha256) by the same recipe doing the
same thing (its method per component) with the same options, unless ``force``
(``maven_edge.calibration.quantize.made_by``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maven_edge.core.errors import BackendError
from maven_edge.core.manifest import MANIFEST, sha256_file


def quantize_int4(fp32: str | Path, out: str | Path, log: Callable[[str], None] | None = None,
                  force: bool = False) -> Path:
    return quantize_recipe(fp32, out, "int4-weight", log=log, force=force)


def quantize_recipe(fp32: str | Path, out: str | Path, recipe: str, log: Callable[[str], None] | None = None,
                    force: bool = False) -> Path:
    try:
        from maven_edge.calibration.quantize import QuantizeOptions, made_by, quantize_artifacts
    except ImportError as exc:
        raise BackendError(f"the int4 quantizer (maven_edge.calibration.quantize) is not available: {exc}") from None

    fp32, out = Path(fp32), Path(out)
    opts = QuantizeOptions(recipe=recipe, block_size=32, accuracy_level=4, quantize_lm_head=True,
                           force=True, progress=False)
    if not force and made_by(out, recipe, sha256_file(fp32 / MANIFEST), opts):
        return out
    quantize_artifacts(fp32, out, opts, log=log)
    return out

"""INT4 artifacts for the benchmark: the project's own ``int4-weight`` recipe on the fp32 export.

Same recipe ``maven-edge quantize --recipe int4-weight`` applies (MatMulNBits, block 32,
accuracy level 4 = int8 compute on CPU, LM head included), i.e. the settings of the
onnxruntime-genai int4 anchor, so the two int4 decoders compare like for like. Reused when the
output's manifest already records this fp32 export as its source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from model_src.errors import BackendError


def quantize_int4(fp32: str | Path, out: str | Path, log: Callable[[str], None] | None = None) -> Path:
    try:
        from calibration.quantize import QuantizeOptions, quantize_artifacts
    except ImportError as exc:
        raise BackendError(f"the int4 quantizer (calibration.quantize) is not available: {exc}") from None
    from export.manifest import MANIFEST, sha256_file

    fp32, out = Path(fp32), Path(out)
    stamp = out / ".bench-source.json"
    quantizer = Path(__file__).resolve().parent.parent / "calibration" / "quantize.py"
    key = {"fp32_manifest_sha256": sha256_file(fp32 / MANIFEST), "quantizer_sha256": sha256_file(quantizer)}
    try:
        if json.loads(stamp.read_text()) == key and (out / MANIFEST).is_file():
            return out
    except (OSError, ValueError):
        pass
    opts = QuantizeOptions(recipe="int4-weight", block_size=32, accuracy_level=4, quantize_lm_head=True,
                           force=True, progress=False)
    quantize_artifacts(fp32, out, opts, log=log)
    stamp.write_text(json.dumps(key))
    return out

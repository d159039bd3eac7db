"""Fixtures for the Node host's tests (hosts/node/test): small exports plus the Python runtime's answers.

    python -m tools.node_fixture [--out DIR]     # prints the fixture directory

Uses the runtime tests' export of their seeded random test model (tools/soak.py: tiny geometry,
fewer layers; torch.onnx decoder, cached under pytest's cache, made here if missing), exports the
same model again with onnxruntime-genai's GroupQueryAttention decoder
(``past_present_share_buffer``; skipped when the builder is not installed) and a variant with
image slots (``config.image_slots``), writes a few images (PNG and JPEG of other sizes, RGBA,
greyscale) and records what the Python side computes for them in ``golden.json``: tokenizer ids,
preprocessed pixel tensors (``.f32`` files) and greedy token ids of a handful of requests on each
export. The Node tests compare against these. Everything is kept under ``--out`` (default: the
pytest cache) and rebuilt only when the exporter, the host contract, the runtime or this file
change. Imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".pytest_cache" / "node-host-fixture"
#: Where tests/test_runtime.py keeps its export of the same test model (pytest's cache.mkdir).
RUNTIME_ARTIFACTS = REPO / ".pytest_cache" / "d" / "maven-runtime-artifacts"
#: Files whose change invalidates the fixture.
KEY_FILES = ("export/onnx_export.py", "export/genai_decoder.py", "core/host_contract.py", "core/preprocess.py",
             "core/tokenizer.py", "runtime/pipeline.py", "runtime/backends/ort_backend.py", "tools/soak.py",
             "tools/node_fixture.py")
TEXTS = ("Image 1: ", "\nQuestion: which image has a red square?\nAnswer:", "typing <eos> and <image_x> here",
         "héllo wörld 😀 日本", "  spaces   and\ttabs\r\n", "")
PROMPTS = (
    "<image>\nQuestion: what color is the circle?\nAnswer:",
    "Image 1: <image>\nImage 2: <image>\nQuestion: which image has a red square?\nAnswer:",
    "Question: how many shapes are there?\nAnswer:",
    "<image>\nDescribe the image. <eos> is text here\nAnswer:",
)


def _key() -> str:
    h = hashlib.sha256()
    for rel in KEY_FILES:
        h.update((REPO / rel).read_bytes())
    return h.hexdigest()[:16]


def _images(out: Path) -> list[dict[str, Any]]:
    from PIL import Image

    rng = np.random.default_rng(7)
    made = []
    for i, (w, h, fmt) in enumerate(((97, 131, "PNG"), (200, 64, "JPEG"), (64, 64, "PNG"), (333, 250, "JPEG"))):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 3 + 40 * i) % 256, (yy * 5) % 256, ((xx * yy) // 7) % 256], -1).astype(np.uint8)
        arr[h // 4: h // 2, w // 3: w // 2] = rng.integers(0, 256, 3)
        path = out / f"img{i}_{w}x{h}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(arr).save(path, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        made.append(path)
    rgba = np.dstack([arr[:120, :90], (np.arange(90)[None, :].repeat(120, 0) * 3 % 256).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(out / "rgba.png")
    Image.fromarray(arr[:50, :70, 0]).save(out / "grey.png")
    made += [out / "rgba.png", out / "grey.png"]
    return [{"path": p.name} for p in made]


def _answers(artifacts: Path, image_dir: Path, images: list[str]) -> list[dict[str, Any]]:
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    pipe = MavenPipeline.from_artifacts(artifacts, session_options=SessionConfig(intra_op_num_threads=1))
    requests = [
        {"images": images[:1], "prompt": PROMPTS[0], "options": {"maxNewTokens": 12}},
        {"images": images[1:3], "prompt": PROMPTS[1], "options": {"maxNewTokens": 12}},
        {"images": [], "prompt": PROMPTS[2], "options": {"maxNewTokens": 8}},
        {"images": images[4:5], "prompt": PROMPTS[3], "options": {"maxNewTokens": 10}},
        {"images": images[:1], "prompt": PROMPTS[0], "options": {"maxNewTokens": 12, "mode": "discrete"}},
    ]
    if "projector" in pipe.backend.sessions:
        requests.append({"images": images[:1], "prompt": PROMPTS[0], "options": {"maxNewTokens": 8, "mode": "continuous"}})
        requests.append({"images": images[:1], "prompt": PROMPTS[0], "options": {"maxNewTokens": 8, "keepRatio": 0.5}})
    for r in requests:
        o = r["options"]
        res = pipe.generate([image_dir / p for p in r["images"]], r["prompt"],
                            max_new_tokens=o["maxNewTokens"], mode=o.get("mode"), keep_ratio=o.get("keepRatio"))
        r.update(token_ids=res.token_ids, text=res.text, finish_reason=res.finish_reason,
                 prompt_tokens=res.prompt_tokens, selected_indices=res.selected_indices)
    return requests


def build(out: Path) -> Path:
    """The fixture directory under `out` (made unless it is up to date)."""
    from maven_edge.core.config import get_config
    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.core.tokenizer import TextTokenizer
    from maven_edge.export.genai_decoder import builder_unavailable
    from maven_edge.export.onnx_export import ExportOptions, export_model
    from tools import soak

    target = out / _key()
    if (target / "golden.json").is_file():
        return target
    shutil.rmtree(out, ignore_errors=True)  # an older fixture
    (target / "images").mkdir(parents=True)
    model = soak.build_test_model()
    # The torch-decoder export is the runtime tests' cached one (pytest makes it first in CI).
    exports = {"torch": soak.cached_test_artifacts(RUNTIME_ARTIFACTS, model)}
    if builder_unavailable() is None:
        exports["genai"] = target / "genai"
        export_model(model, ExportOptions(out=exports["genai"], progress=False, check_load=False, decoder="genai"))
    # A model with image slots (a learned vector per image position added to its sequence).
    from maven_edge.model_src.checkpoint import build_model

    slots_cfg = get_config(soak.TEST_PRESET, [*soak.TEST_OVERRIDES, "image_slots=true"])
    exports["slots"] = target / "slots"
    export_model(build_model(slots_cfg, seed=soak.TEST_SEED),
                 ExportOptions(out=exports["slots"], progress=False, check_load=False))
    images = _images(target / "images")
    names = [i["path"] for i in images]
    pre = get_config(soak.TEST_PRESET, list(soak.TEST_OVERRIDES)).preprocess
    for i, name in enumerate(names):
        arr = preprocess_images([target / "images" / name], pre)
        arr.tofile(target / "images" / f"{name}.f32")
        images[i]["pixels"] = f"{name}.f32"
        images[i]["shape"] = list(arr.shape)
    tok = TextTokenizer.from_file(exports["torch"] / "tokenizer.json", model.config.llm.text_vocab_size,
                                  model.config.discrete.codebook_size)
    golden = {
        "exports": {k: str(v) for k, v in exports.items()},
        "texts": [{"text": t, "ids": tok.encode(t)} for t in TEXTS],
        "prompts": [{"prompt": p, "ids": tok.encode_prompt(p)} for p in PROMPTS],
        "decode": [{"ids": ids, "text": tok.decode(ids)} for ids in ([40, 276, 464, 25, 220], [497, 72, 276, 600, 800])],
        "images": images,
        "answers": {k: _answers(v, target / "images", names) for k, v in exports.items()},
    }
    (target / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

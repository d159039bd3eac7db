"""The manifest's ``host`` section (core/host_contract.py, docs/hosts.md): written by the export,
equal to what the Python runtime does, optional for Python (older manifests still load), and
addable to an older export in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maven_edge.core.config import get_config
from maven_edge.core.host_contract import HOST_CONTRACT_VERSION, add_host_section, host_section
from maven_edge.core.manifest import MANIFEST, load_manifest
from maven_edge.core.preprocess import preprocess_images
from maven_edge.core.prompt import make_prompt
from maven_edge.core.tokenizer import TextTokenizer
from tools import soak


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    return soak.cached_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


def test_export_writes_the_host_section_of_its_config(artifacts: Path) -> None:
    m = load_manifest(artifacts)
    cfg, layout = m.maven_config(), m.vocab_layout()
    assert m.host == json.loads(json.dumps(host_section(cfg, layout, m.tokenizer.path)))
    h = m.host
    assert h["version"] == HOST_CONTRACT_VERSION
    assert h["tokenizer"]["decode_below"] == layout.tokenizer_size == h["generation"]["sample_below"]
    assert h["visual_sequence"]["tokens_per_image"] == cfg.visual_tokens_per_image(m.mode)
    assert h["visual_sequence"]["kept_patches"] == m.num_kept_patches == h["selector"]["k"]
    names = [x for x in h["visual_sequence"]["layout"] + h["h_eos"]["input"] + h["tokenizer"]["prompt_prefix"]
             + h["generation"]["stop_tokens"] if x not in ("codes", "patches")]
    assert all(name in layout.special_ids for name in names)


def test_prompt_template_is_the_training_layout() -> None:
    t = host_section(get_config("tiny"), TextTokenizer.default(512, 256).layout)["prompt"]["template"]
    for n in (0, 1, 3):
        images = t["single_image"] if n == 1 else t["image_line_join"].join(
            t["image_line"].format(k=k + 1) for k in range(n))
        assert t["prompt"].format(images=images, text="Question: x?") == make_prompt(n, "Question: x?")
    assert make_prompt(2, "Q") == "Image 1: <image>\nImage 2: <image>\nQ\nAnswer:"


def test_preprocess_numerics_reproduce_the_runtime(tmp_path: Path) -> None:
    """The steps host.preprocess describes, done by hand, give preprocess_images' tensor bit for bit."""
    cfg = get_config("tiny").preprocess
    hp = host_section(get_config("tiny"), TextTokenizer.default(512, 256).layout)["preprocess"]
    rgb = (np.arange(97 * 131 * 3, dtype=np.uint32).reshape(131, 97, 3) * 7 % 256).astype(np.uint8)
    alpha = (np.arange(97)[None, :].repeat(131, 0) * 3 % 256).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    a = alpha[..., None].astype(np.uint32)
    bg = np.asarray(hp["alpha_background"], np.uint32)
    composited = ((rgb * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
    assert hp["resize_then_pad"] and hp["resize_passes"].startswith("horizontal")
    size = hp["size"][0]
    h, w = composited.shape[:2]
    long = max(w, h)
    fw, fh = (max(1, (2 * n * size + long) // (2 * long)) for n in (w, h))  # fitted_size
    fitted = Image.fromarray(composited).resize((fw, h), Image.Resampling.BICUBIC)  # horizontal pass
    fitted = np.asarray(fitted.resize((fw, fh), Image.Resampling.BICUBIC))  # then vertical
    resized = np.empty((size, size, 3), np.uint8)
    resized[:] = hp["pad_color"]
    y0, x0 = (size - fh) // 2, (size - fw) // 2  # pad_offset
    resized[y0:y0 + fh, x0:x0 + fw] = fitted
    x = (resized.astype(np.float64) * hp["rescale"]).astype(np.float32)
    x = (x - np.asarray(hp["mean"], np.float32)) / np.asarray(hp["std"], np.float32)
    expected = x.transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(preprocess_images([tmp_path / "a.png"], cfg), expected)


def test_older_manifests_load_and_get_the_section_added(artifacts: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(artifacts, old)
    raw = json.loads((old / MANIFEST).read_text())
    section = raw.pop("host")
    (old / MANIFEST).write_text(json.dumps(raw))
    m = load_manifest(old)  # Python never needs it
    assert m.host == {}
    from maven_edge.runtime.pipeline import MavenPipeline

    MavenPipeline.from_artifacts(old).prepare_prompt("<image> hi", 1)
    assert add_host_section(old) is True
    assert load_manifest(old).host == section  # verified again: no listed file changed
    assert add_host_section(old) is False

"""The device runtime imports neither torch nor transformers (issue 6, item 3).

A fresh interpreter imports the runtime and the CLI, runs a generation on exported artifacts
with the ort backend, and proves that torch/transformers never entered ``sys.modules``. A
meta-path hook also makes any attempt to import them fail loudly, so a lazy import on some
code path would be caught too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime import DEMO_IMAGES, DEMO_PROMPT, export_test_artifacts

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"the torch-free runtime tried to import {name}")
        return None

sys.meta_path.insert(0, Block())

import maven_edge.runtime.pipeline, maven_edge.runtime.backends, maven_edge.runtime.backends.ort_backend, maven_edge.runtime.backends.trt_backend
import maven_edge.runtime.commands, maven_edge.cli
from maven_edge.runtime.pipeline import MavenPipeline

artifacts, images, prompt = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = MavenPipeline.from_artifacts(artifacts, backend="ort", providers=["cpu"])
res = pipe.generate(images, prompt, max_new_tokens=4)
pieces = list(pipe.stream(images, prompt, max_new_tokens=4))
for mode in ("discrete", "continuous"):
    pipe.generate(images, prompt, max_new_tokens=2, mode=mode)
# the CLI path too
rc = maven_edge.cli.main(["generate", "--artifacts", artifacts, "--prompt", prompt, "--max-new-tokens", "2",
                       "--quiet"] + sum((["--image", i] for i in images), []))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"tokens": res.token_ids, "joined": "".join(pieces) == res.text, "heavy": heavy, "rc": rc}))
"""


@pytest.fixture(scope="module")
def artifacts(pytestconfig) -> Path:
    return export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


def test_ort_runtime_never_imports_torch(artifacts):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(artifacts), json.dumps(DEMO_IMAGES), DEMO_PROMPT],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["tokens"] and result["joined"] and result["rc"] == 0

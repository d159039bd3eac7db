"""The wheel a user installs: one import root, package data inside it, nothing written beside the code.

Builds the wheel from a clean copy of the tracked sources (as from a fresh clone), installs it
into a new virtual environment (without its dependencies, which come from the test
environment's site-packages through a .pth path line: the editable install of this checkout is
not visible there), and runs ``maven-edge`` from an empty directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOREIGN_NAMES = {"runtime", "export", "benchmarks", "calibration", "model_src", "core", "tools", "tests", "serving"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A fresh venv with the built wheel installed; returns its python, script and site-packages."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked sources")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = _run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."],
         cwd=src)
    wheel = next(dist.glob("maven_edge-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # dependencies from the test environment; a path line does not run that folder's .pth files,
    # so this checkout's editable install stays invisible
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)])
    return {"python": py, "script": venv / "bin" / "maven-edge", "site": site, "wheel": wheel}


def test_wheel_installs_one_top_level_package(installed):
    site = installed["site"]
    top = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))}
    assert "maven_edge" in top
    assert not top & FOREIGN_NAMES, f"top-level folders that are not ours to take: {top & FOREIGN_NAMES}"
    ckpt = site / "maven_edge" / "model_src" / "checkpoints" / "tiny" / "model.safetensors"
    assert ckpt.is_file() and (site / "maven_edge" / "model_src" / "samples" / "demo.json").is_file()


def test_installed_package_imports_from_an_empty_directory(installed, tmp_path):
    out = _run([str(installed["python"]), "-c",
                "import maven_edge, maven_edge.runtime.pipeline as p; print(maven_edge.__version__); "
                "print(p.__file__); print(maven_edge.MavenPipeline.__name__)"],
               cwd=tmp_path).stdout.split()
    version, module, name = out
    assert version == _run([sys.executable, "-c", "import maven_edge; print(maven_edge.__version__)"]).stdout.strip()
    assert Path(module).is_relative_to(installed["site"]) and name == "MavenPipeline"
    assert _run([str(installed["script"]), "--version"], cwd=tmp_path).stdout.strip() == f"maven-edge {version}"


def test_demo_from_the_wheel_answers_and_writes_nothing_beside_the_code(installed, tmp_path):
    before = _snapshot(installed["site"])
    work = tmp_path / "empty"
    work.mkdir()
    env = dict(os.environ, MAVEN_EDGE_CACHE=str(tmp_path / "cache"))
    res = _run([str(installed["script"]), "demo", "--threads", "2"], cwd=work, env=env)
    answer = next(line for line in res.stdout.splitlines() if line.startswith("answer:"))
    assert "(expected: image 3)" in answer and answer.split("(expected")[0].strip() == "answer: image 3"
    assert _snapshot(installed["site"]) == before, "the demo wrote inside site-packages"
    assert list(work.iterdir()) == [], "the demo wrote into the working directory"
    assert (tmp_path / "cache" / "demo" / "tiny" / "manifest.json").is_file()

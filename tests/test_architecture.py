"""The package's shape: one import root, every package folder installed, layers pointing one way."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.check_layers import REPO, check, package_dirs

LAYER_ROOTS = ("maven_edge", "core", "model_src", "export", "calibration", "runtime", "serving", "benchmarks")


def test_every_package_folder_is_installed_under_maven_edge():
    listed = {folder.resolve() for folder in package_dirs().values()}
    assert all(pkg == "maven_edge" or pkg.startswith("maven_edge.") for pkg in package_dirs())
    on_disk = {init.parent.resolve() for root in LAYER_ROOTS if (REPO / root).is_dir()
               for init in (REPO / root).rglob("__init__.py")}
    assert on_disk - listed == set(), "package folders missing from pyproject.toml [tool.setuptools] packages"
    assert listed - on_disk == set()


def test_import_contracts_hold():
    res = check(quiet=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def _copy_sources(dest: Path) -> None:
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    for folder in {f for f in package_dirs().values()}:
        rel = folder.relative_to(REPO)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for src in folder.glob("*.py"):
            shutil.copy2(src, dest / rel / src.name)


def test_a_backward_import_breaks_the_layers_contract(tmp_path):
    _copy_sources(tmp_path)
    errors = tmp_path / "core" / "errors.py"  # the lowest layer reaching up into the runtime
    errors.write_text(errors.read_text() + "\nfrom maven_edge.runtime import pipeline  # noqa: E402\n")
    res = check(tmp_path, quiet=True)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "maven_edge.core.errors -> maven_edge.runtime.pipeline" in res.stdout


def test_torch_in_the_core_breaks_its_contract(tmp_path):
    _copy_sources(tmp_path)
    sampling = tmp_path / "core" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\nimport torch  # noqa: E402,F401\n")
    res = check(tmp_path, quiet=True)
    assert res.returncode != 0 and "maven_edge.core.sampling -> torch" in res.stdout

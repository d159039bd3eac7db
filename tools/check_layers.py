"""Check the import contracts in pyproject.toml ([tool.importlinter]) with import-linter.

    python -m tools.check_layers            # exit 0 when every contract holds

import-linter (grimp) finds a package's modules by walking the folder of its top-level package,
but maven_edge's subpackages live in the design's top-level folders (core/, model_src/, export/,
...) mapped into ``maven_edge`` by setuptools' package-dir. So the check first builds, in a
temporary folder, the tree an installed wheel would have (real folders, each .py file a symlink
to the source) and runs import-linter on that tree. The test suite runs this (tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = REPO) -> dict[str, Path]:
    """Every package pyproject.toml installs -> its source folder (setuptools' package-dir rules)."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setup.get("package-dir", {})
    out = {}
    for pkg in setup["packages"]:
        prefix = max((p for p in mapping if pkg == p or pkg.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            folder = root / pkg.replace(".", "/")
        else:
            rest = pkg[len(prefix):].lstrip(".")
            folder = root / mapping[prefix] / rest.replace(".", "/")
        out[pkg] = folder
    return out


def mirror(dest: Path, root: Path = REPO) -> Path:
    """The installed layout of the packages under `dest`, files symlinked to `root`'s sources."""
    for pkg, folder in package_dirs(root).items():
        target = dest / pkg.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for src in folder.glob("*.py"):
            (target / src.name).symlink_to(src.resolve())
    return dest


def check(root: Path = REPO, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run lint-imports on `root`'s packages and contracts; the CompletedProcess (returncode 0 = all hold)."""
    with tempfile.TemporaryDirectory(prefix="maven-layers-") as tmp:
        tree = mirror(Path(tmp) / "tree", root)
        env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
               "sys.exit(c())", str(root / "pyproject.toml"), "--no-cache"]
        return subprocess.run(cmd, cwd=tree, env=env, capture_output=quiet, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="repository root (default: this clone)")
    args = ap.parse_args(argv)
    return check(Path(args.root)).returncode


if __name__ == "__main__":
    sys.exit(main())

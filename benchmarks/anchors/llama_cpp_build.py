"""Build llama.cpp's command-line tools from source, the way a user does, once per machine.

Where the sources come from (first that applies):

1. ``--llama-cpp-src DIR`` (or ``$MAVEN_EDGE_LLAMA_CPP_SRC``): a llama.cpp checkout, an unpacked
   ``llama-cpp-python`` sdist (its ``vendor/llama.cpp`` is used), or such an sdist's ``.tar.gz``;
2. otherwise the ``llama-cpp-python`` sdist from the package index, fetched once with
   ``pip download --no-deps --no-binary :all: llama-cpp-python`` into the cache (the sdist vendors
   llama.cpp; this is what ``pip install llama-cpp-python`` compiles).

The build is a plain CMake release build of the tools the benchmark drives, static so the
binaries can be copied: ``llama-bench`` (text prefill/decode) and ``llama-mtmd-cli`` (multimodal
time to first token with an ``mmproj`` file)::

    cmake -S SRC -B BUILD -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
          -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
          -DLLAMA_BUILD_SERVER=OFF -DCMAKE_C_FLAGS=... -DCMAKE_CXX_FLAGS=...
    cmake --build BUILD --config Release -j JOBS --target llama-bench llama-mtmd-cli

``GGML_NATIVE`` tunes for this CPU; on x86 the AMX instruction sets are switched off
(``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16``): ggml's AMX kernels crash at model load for
Q8_0/Q4_0 on CPUs that advertise AMX (``ldtilecfg`` in ``ggml_backend_amx_mul_mat``). An explicit
``-mno-*`` wins over what ``-march=native`` implies, so the rest of the native tuning stays.

The finished binaries live in ``CACHE/llama.cpp/<key>/bin`` with a ``build.json`` (source, flags,
compiler, the measured build seconds); the key hashes the source identity and the flags, so a
second bench run reuses them. :func:`ensure_build` never raises for a build that cannot be made:
it returns a :class:`LlamaCppBuild` whose ``error`` says why, and the bench runs without llama.cpp.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_SRC = "MAVEN_EDGE_LLAMA_CPP_SRC"
TOOLS = ("llama-bench", "llama-mtmd-cli")
SDIST_PACKAGE = "llama-cpp-python"
AMX_OFF = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


@dataclass
class LlamaCppBuild:
    """Where the tools are, or why there are none."""

    bin_dir: Path | None = None
    source: str = ""
    version: str = ""
    seconds: float = 0.0  # build time when it was built (also kept when reused)
    cached: bool = False
    flags: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.bin_dir is not None

    def tool(self, name: str) -> Path:
        assert self.bin_dir is not None
        return self.bin_dir / name

    def describe(self) -> dict[str, Any]:
        return {"bin_dir": str(self.bin_dir) if self.bin_dir else None, "source": self.source,
                "version": self.version, "build_seconds": round(self.seconds, 1), "cached": self.cached,
                "flags": self.flags, "error": self.error}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def cmake_flags(jobs: int | None = None) -> list[str]:
    """The configure flags (deterministic: part of the cache key)."""
    extra = " ".join(AMX_OFF) if _is_x86() else ""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    if extra:
        flags += [f"-DCMAKE_C_FLAGS={extra}", f"-DCMAKE_CXX_FLAGS={extra}"]
    return flags


def _llama_root(path: Path) -> Path | None:
    """The llama.cpp source root inside `path` (a checkout, or an unpacked llama-cpp-python sdist)."""
    for cand in (path, path / "vendor" / "llama.cpp"):
        if (cand / "CMakeLists.txt").is_file() and (cand / "tools" / "mtmd").is_dir():
            return cand
    return None


def _unpack(tar: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        top = t.getnames()[0].split("/")[0]
        if not (into / top).is_dir():
            t.extractall(into, filter="data")
    return into / top


def _download_sdist(cache: Path, say: Callable[[str], None]) -> Path:
    dl = cache / "sdist"
    found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        dl.mkdir(parents=True, exist_ok=True)
        say(f"fetching the {SDIST_PACKAGE} sdist (vendors llama.cpp) into {dl}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
               SDIST_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"pip download {SDIST_PACKAGE} failed: {(proc.stderr or proc.stdout)[-400:]}")
    return found[-1]


def resolve_source(src: str | Path | None, cache: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    """(llama.cpp source root, a human-readable identity of it)."""
    src = src or os.environ.get(ENV_SRC) or None
    if src is None:
        tar = _download_sdist(cache, say)
        root = _llama_root(_unpack(tar, cache / "src"))
        ident = tar.name
    else:
        p = Path(src).expanduser().resolve()
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            root, ident = _llama_root(_unpack(p, cache / "src")), p.name
        else:
            root, ident = _llama_root(p), str(p)
    if root is None:
        raise RuntimeError(f"no llama.cpp sources (CMakeLists.txt and tools/mtmd) in {src or 'the sdist'}")
    return root, ident


def _version(root: Path) -> str:
    """llama.cpp's build number when it is a git checkout, else the sdist version around it."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--tags", "--always"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip() and (root / ".git").exists():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    pkg = root.parent.parent / "PKG-INFO"
    if pkg.is_file():
        for line in pkg.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return f"{SDIST_PACKAGE} {line.split(':', 1)[1].strip()} (vendored llama.cpp)"
    return "unknown"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def ensure_build(cache: Path, src: str | Path | None = None, jobs: int = 2,
                 log: Callable[[str], None] | None = None) -> LlamaCppBuild:
    """Build (or reuse) llama.cpp's tools under ``cache/llama.cpp``; never raises for a failed build."""
    say = log or (lambda _m: None)
    base = cache / "llama.cpp"
    flags = cmake_flags()
    if shutil.which("cmake") is None:
        return LlamaCppBuild(error="cmake is not installed here, so llama.cpp cannot be built from source")
    try:
        root, ident = resolve_source(src, base, say)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        return LlamaCppBuild(flags=flags, error=f"no llama.cpp sources: {exc}")
    version = _version(root)
    key = {"source": ident, "version": version, "flags": flags, "compiler": _compiler(), "machine": platform.machine()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    home = base / digest
    info_path, bin_dir = home / "build.json", home / "bin"
    if info_path.is_file() and all((bin_dir / t).is_file() for t in TOOLS):
        info = json.loads(info_path.read_text())
        return LlamaCppBuild(bin_dir=bin_dir, source=ident, version=version, seconds=float(info.get("seconds", 0)),
                             cached=True, flags=flags)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second bench on this machine waits for the first one's build
        if info_path.is_file() and all((bin_dir / t).is_file() for t in TOOLS):
            info = json.loads(info_path.read_text())
            return LlamaCppBuild(bin_dir=bin_dir, source=ident, version=version,
                                 seconds=float(info.get("seconds", 0)), cached=True, flags=flags)
        return _build(root, home, key, jobs, flags, ident, version, say)


def _build(root: Path, home: Path, key: dict[str, Any], jobs: int, flags: list[str], ident: str, version: str,
           say: Callable[[str], None]) -> LlamaCppBuild:
    info_path, bin_dir = home / "build.json", home / "bin"
    build = home / "build"
    log_path = home / "build.log"
    say(f"building llama.cpp ({version}) from {root} with {jobs} jobs; log: {log_path}")
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        for cmd in (["cmake", "-S", str(root), "-B", str(build), *flags],
                    ["cmake", "--build", str(build), "--config", "Release", "-j", str(max(1, jobs)),
                     "--target", *TOOLS]):
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = log_path.read_text(errors="replace")[-600:]
                return LlamaCppBuild(source=ident, version=version, flags=flags,
                                     error=f"llama.cpp build failed ({cmd[1]} exit {rc}); see {log_path}: {tail}")
    seconds = time.perf_counter() - t0
    bin_dir.mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        found = next((p for p in (build / "bin" / t, build / t) if p.is_file()), None)
        if found is None:
            return LlamaCppBuild(source=ident, version=version, flags=flags, error=f"the build made no {t}")
        shutil.copy2(found, bin_dir / t)
    info_path.write_text(json.dumps({**key, "seconds": round(seconds, 1), "jobs": jobs, "root": str(root)}, indent=1))
    say(f"llama.cpp built in {seconds:.0f} s -> {bin_dir}")
    return LlamaCppBuild(bin_dir=bin_dir, source=ident, version=version, seconds=seconds, cached=False, flags=flags)

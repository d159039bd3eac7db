"""Record the TensorRT Python API of several TensorRT releases, without a GPU (dev tool).

    python tools/trt_api_table.py                       # the releases in RELEASES -> calibration/trt_api.json
    python tools/trt_api_table.py 10.3.0 11.4.0.106 --out /tmp/api.json

Why this works without a GPU: the ``tensorrt-*-bindings`` wheels on PyPI hold only the pybind11
module (``tensorrt.so``, ~1 MB); the libraries it links (``libnvinfer.so.N``, the ONNX parser and
the plugins) come from ``tensorrt-*-libs``, which PyPI serves only as a stub that downloads from
NVIDIA's own index at install time (not reachable here, and gigabytes). The module, however, calls
into those libraries only when a builder, runtime or parser is created; at import it needs their
*symbols*. This tool compiles empty stand-ins that export those symbols (a C compiler is
needed), imports the real bindings against them in a child process, and records ``dir()`` of the
classes and enums maven-edge uses. Nothing is executed on a GPU and nothing from TensorRT is
redistributed: the output is a table of names.

The table is what ``tests/test_trt_api.py`` builds its strict fake TensorRT from: every attribute
the builder and the trt backend touch must exist in every release their recipe claims to support.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "calibration" / "trt_api.json"

#: Releases recorded by default: JetPack 6.0 (8.6), the first 10.x, JetPack 6.1/6.2 (10.3), the
#: last 10.x that does not deprecate weak typing (10.11), the one that does (10.12), the newest
#: 10.x, and the first and newest 11.x.
RELEASES = ("8.6.1", "10.0.1", "10.3.0", "10.11.0.33", "10.12.0.36", "10.16.1.11", "11.0.0.114", "11.4.0.106")

#: Classes and enums whose members are recorded (everything maven-edge's TensorRT code touches,
#: and the calibrator / strongly-typed names the version checks ask about).
CLASSES = (
    "Logger", "Builder", "IBuilderConfig", "INetworkDefinition", "ILayer", "ITensor", "IElementWiseLayer",
    "IUnaryLayer", "OnnxParser", "IOptimizationProfile", "ICudaEngine", "IExecutionContext", "Runtime",
    "ITimingCache", "IHostMemory", "BuilderFlag", "MemoryPoolType", "NetworkDefinitionCreationFlag",
    "TensorIOMode", "LayerType", "DataType", "ElementWiseOperation", "UnaryOperation", "IInt8Calibrator",
    "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "CalibrationAlgoType", "QuantizationFlag",
    "ParserError",
)

_INTROSPECT = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
trt = importlib.import_module(sys.argv[2])
classes = json.loads(sys.argv[3])
out = {"version": str(trt.__version__), "module": sorted(n for n in dir(trt) if not n.startswith("_")), "classes": {}}
for name in classes:
    obj = getattr(trt, name, None)
    if obj is not None:
        out["classes"][name] = sorted(n for n in dir(obj) if not n.startswith("_"))
print(json.dumps(out))
"""

_PROVIDED = re.compile(r"^(Py|_Py|_ITM|__gmon|__cxa|__gxx|__dynamic|__pthread)")


def _package(release: str) -> str:
    major = int(release.split(".")[0])
    return f"tensorrt-bindings=={release}" if major < 10 else f"tensorrt-cu12-bindings=={release}"


def _download(release: str, cache: Path) -> Path:
    name = _package(release)
    found = [p for p in cache.glob("tensorrt*bindings-*.whl") if f"-{release}-" in p.name]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), name], check=True)
        found = [p for p in cache.glob("tensorrt*bindings-*.whl") if f"-{release}-" in p.name]
    if not found:
        raise SystemExit(f"pip did not download a wheel for {name}")
    return found[0]


def _undefined_nv_symbols(so: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], check=True, capture_output=True, text=True).stdout
    syms = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return sorted(s for s in syms if "@" not in s and not _PROVIDED.match(s))


def _needed_nv_libs(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\[(libnv[^\]]+)\]", out)


def record(release: str, cache: Path) -> dict:
    wheel = _download(release, cache)
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        root = Path(tmp)
        zipfile.ZipFile(wheel).extractall(root / "site")
        so = next((root / "site").glob("*/tensorrt.so"))
        stub = root / "stub"
        stub.mkdir()
        src = stub / "stub.c"
        src.write_text("".join(f'void* f{i}(void) __asm__("{s}");\nvoid* f{i}(void) {{ return 0; }}\n'
                               for i, s in enumerate(_undefined_nv_symbols(so))))
        for lib in _needed_nv_libs(so):
            subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stub / lib), f"-Wl,-soname,{lib}", str(src)], check=True)
        res = subprocess.run([sys.executable, "-c", _INTROSPECT, str(root / "site"), so.parent.name,
                              json.dumps(CLASSES)], capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(stub)})
        if res.returncode:
            raise SystemExit(f"importing the {release} bindings failed:\n{res.stderr[-2000:]}")
        data = json.loads(res.stdout)
    data["wheel"] = wheel.name
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("releases", nargs="*", default=list(RELEASES))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "trt-bindings-wheels")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    table = {"how": "tools/trt_api_table.py: dir() of the real tensorrt bindings wheels imported against stub "
                    "libraries (no GPU, no libnvinfer)", "releases": {}}
    for release in args.releases:
        data = record(release, args.cache)
        table["releases"][release] = data
        print(f"{release}: {len(data['module'])} module names, {len(data['classes'])} classes", file=sys.stderr)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measurement primitives shared by every benchmark: repeats, robust summaries, memory, machine.

    stat = summarize([12.1, 11.8, 12.6])          # Stat(median=12.1, min=11.8, max=12.6, ...)
    samples = repeat(fn, warmup=1, repeats=5)      # fn() -> float (or a dict of floats)
    with PeakRSS() as mem: work()                  # mem.peak_bytes (sampled), mem.delta_bytes
    info = machine_info(threads=2)                 # CPU, cores, memory, library versions, providers

Rules every number in a report follows:

- warm-up runs are never counted; each configuration is measured ``repeats`` times and reported
  as the **median** with the min/max and the relative spread ``(max - min) / median``;
- every timer is ``time.perf_counter``;
- memory is the peak resident set size (RSS) of the process that ran the engine (benchmarks run
  each engine in its own worker process, so one engine's memory never counts for another);
- the machine description (CPU, logical/physical cores, memory, load average at the start, the
  versions of every library involved and onnxruntime's execution providers) goes into every
  result file, so two result files can be compared knowingly.

This module is torch-free and imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

#: Distributions whose versions go into every report (absent ones are listed as None).
LIBRARIES = (
    "maven-edge", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnx-ir",
    "onnxscript", "transformers", "tokenizers", "optimum", "optimum-onnx", "llama-cpp-python", "gguf", "tensorrt",
)


# ---- summaries ---------------------------------------------------------------------------


@dataclass
class Stat:
    """Summary of repeated measurements of one quantity."""

    median: float
    min: float
    max: float
    mean: float
    n: int
    samples: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative run-to-run range (0 for a single sample)."""
        return (self.max - self.min) / abs(self.median) if self.median else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = self.spread
        return d

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        """'12.1 ms ±4%' style text for tables."""
        pct = f" ±{100 * self.spread / 2:.0f}%" if self.n > 1 else ""
        return f"{self.median:.{digits}f}{(' ' + unit) if unit else ''}{pct}"


def summarize(samples: Sequence[float]) -> Stat:
    """Median, min, max and mean of `samples` (at least one)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("summarize() needs at least one sample")
    return Stat(median=statistics.median(xs), min=min(xs), max=max(xs), mean=statistics.fmean(xs), n=len(xs),
                samples=xs)


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    """Per-key :class:`Stat` over a list of ``{name: number}`` records (keys from the first record;
    non-numeric values and keys missing from some records are skipped)."""
    if not records:
        return {}
    out = {}
    for key in records[0]:
        values = [r.get(key) for r in records]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = summarize(values)  # type: ignore[arg-type]
    return out


def repeat(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3,
           on_sample: Callable[[int], None] | None = None) -> list[Any]:
    """Call `fn` `warmup` times (discarded), then `repeats` times; return the measured results.

    `fn` measures itself (it returns a number or a record of numbers), so a benchmark can time
    exactly the part it reports. `on_sample(i)` is called after each counted run (progress).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    results = []
    for i in range(repeats):
        results.append(fn())
        if on_sample is not None:
            on_sample(i)
    return results


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["ms"]``."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["ms"] = (time.perf_counter() - t0) * 1e3


# ---- memory ------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency; /proc fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process over its whole life (getrusage)."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb) * (1 if sys.platform == "darwin" else 1024)
    except Exception:  # pragma: no cover - not on POSIX
        return rss_bytes()


class PeakRSS:
    """Samples this process's RSS in a background thread; ``peak_bytes`` after the block.

    ``start_bytes`` is the RSS when the block began and ``delta_bytes`` the peak growth within it
    (what the block itself needed on top of what was already resident). It is a sampled peak: memory
    held for less than about ``interval_s`` (or while the sampler thread is not scheduled, on a
    loaded machine) can be missed.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


# ---- machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD features that decide CPU kernel choice (AVX2, AVX-512, VNNI, AMX...)."""
    interesting = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                   "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in interesting if x in have]
    except OSError:
        pass
    return []


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions (from package metadata, nothing is imported); None when absent."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> list[dict[str, str]]:
    """GPUs nvidia-smi reports (empty when there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge a result file: CPU, cores, memory, load, versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "threads_used": threads,
        "libraries": library_versions(),
        "gpus": gpu_info(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_total_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
        info["memory_available_gb"] = round(psutil.virtual_memory().available / 1e9, 1)
    except Exception:  # pragma: no cover
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on POSIX
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        info["onnxruntime_providers"] = []
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for headers: 'AMD EPYC, 2 cores (2 used), 23.4 GB, no GPU, load 1.2'."""
    gpus = info.get("gpus") or []
    gpu = ", ".join(g["name"] for g in gpus) if gpus else "no GPU"
    load = info.get("load_average")
    return (f"{info.get('cpu')}, {info.get('logical_cores')} logical cores ({info.get('threads_used')} used), "
            f"{info.get('memory_total_gb', '?')} GB RAM, {gpu}"
            + (f", load average at start {load[0]}" if load else ""))

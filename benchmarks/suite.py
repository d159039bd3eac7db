"""The benchmark suite: plan, run every job in its own worker process, collect, report.

    from maven_edge.benchmarks.suite import BenchOptions, run_bench
    report = run_bench(BenchOptions(preset="edge-small", out="artifacts/bench/edge-small"))
    report.ratios["ort_fp32_vs_genai_fp32"], report.files["json"]

Sections (all by default):

- ``roofline``: the machine's memory bandwidth and matmul FLOP/s (:mod:`maven_edge.benchmarks.roofline`);
- ``pipeline``: the multimodal pipeline per backend over modes x image counts: per-stage latency
  (preprocess, vision, discrete tokenizer, h_eos pass, selector, assemble, prefill, decode),
  TTFT, per-token decode, end-to-end and peak memory;
- ``text``: text-only greedy generation of a fixed random prompt on the same decoder weights in
  our engines (``ort`` fp32/int8/int8-dynamic/int4, ``torch``) and the anchors (``hf``, ``genai`` fp32/int4,
  ``optimum``, ``llamacpp`` f32/q8_0/q4_0), with our ORT decode speed as ratios to each.

The ``ort`` pipeline is measured once per ``pipeline_recipes`` entry (fp32, and the
latency-optimised recipes made here with the project's quantizer); with the ``llamacpp`` anchor,
the pipeline section also measures llama.cpp's multimodal runtime (``llama-mtmd-cli``) on a
LLaVA-style model of the same geometry (our decoder + our ViT and projector as an mmproj) at
each llama.cpp precision. llama.cpp is built from source once
(:mod:`maven_edge.benchmarks.anchors.llama_cpp_build`) into the cache directory; where it cannot
be built, the bench says why and runs without it.

The model comes from ``--preset`` (seeded random weights), ``--checkpoint`` or ``--artifacts``
(whose manifest names its source). It is saved once into a cache directory keyed by its
weights' fingerprint: the maven-edge checkpoint, the HF-format decoder checkpoint every anchor
converts from, our ONNX export and each anchor's converted model, so a second run reuses them.
Nothing is downloaded: workers run with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.benchmarks.harness import describe_machine, machine_info
from maven_edge.benchmarks.worker import PIPELINE_VARIANTS
from maven_edge.core import paths
from maven_edge.core.config import VISUAL_MODES
from maven_edge.core.errors import BackendError, InputError
from maven_edge.core.manifest import load_manifest
from maven_edge.runtime.backends import BACKENDS as RUNTIME_BACKENDS

SECTIONS = ("roofline", "pipeline", "text", "caches")
#: the runtime's backends (runtime.backends.BACKENDS) the suite measures: every one that runs on a CPU
BACKENDS = tuple(name for name in RUNTIME_BACKENDS if name != "trt")
DEFAULT_ANCHORS = ("hf", "genai", "optimum", "llamacpp")
#: Precisions per engine measured by default (int4 for ours only when int4 artifacts exist or
#: can be made with the project's quantizer).
ENGINE_PRECISIONS = {"ort": ("fp32", "int8", "int8-dynamic", "int4", "fp32-dynamo"), "torch": ("fp32",), "hf": ("fp32",), "genai": ("fp32", "int4"),
                     "optimum": ("fp32",), "llamacpp": ("fp32", "q8_0", "q4_0")}
#: Our artifact sets the ort pipeline runs by default: the fp32 export and the latency recipes.
PIPELINE_RECIPES = ("fp32", "vision-int8", "latency-int8", "latency-int4")
#: The text section's ort int8 rows and the recipe whose decoder each measures (made unless a pipeline
#: recipe of the run has the same decoder): "int8" the 8-bit MatMulNBits (weight-only), "int8-dynamic"
#: int8 weights per channel and int8 activations quantized at run time (MatMulInteger /
#: DynamicQuantizeMatMul), as llama.cpp's Q8_0 quantizes activations to q8 for its dot products.
INT8_TEXT_RECIPES = {"int8": "int8-weight", "int8-dynamic": "int8-dynamic"}


@dataclass
class BenchOptions:
    """Everything `maven-edge bench` can be told."""

    out: str | Path
    artifacts: str | None = None  # exported artifacts (ort backend); their manifest names the source model
    int4_artifacts: str | None = None  # int4 artifacts of the same model (default: quantized here when possible)
    preset: str | None = None  # seeded random weights of a preset
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    images: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    modes: list[str] = field(default_factory=lambda: list(VISUAL_MODES))
    new_tokens: int = 64
    pipeline_new_tokens: int | None = None  # new tokens per pipeline request (default: new_tokens)
    prompt_len: int = 256  # text protocol prompt length
    repeats: int = 3
    warmup: int = 1
    anchors: list[str] = field(default_factory=lambda: list(DEFAULT_ANCHORS))
    precisions: list[str] | None = None  # restrict every engine to these precisions
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    threads: int = 0  # 0 = all logical cores
    quick: bool = False
    export: bool = True  # export (and quantize) artifacts for --preset/--checkpoint when missing
    prepare_only: bool = False  # build every converted model into the cache, measure nothing
    reexport: bool = False  # redo our export (and int4) even when the cache holds one of the same weights
    decoder: str | None = None  # our decoder.onnx: "genai" (model builder) or "torch"; None: genai if installed
    pipeline_recipes: list[str] = field(default_factory=lambda: list(PIPELINE_RECIPES))  # ort pipeline artifact sets
    llama_cpp_src: str | None = None  # llama.cpp sources (checkout, llama-cpp-python sdist dir or .tar.gz)
    llama_cpp_jobs: int = 2  # parallel compile jobs for the one-time llama.cpp build
    ort_spinning: bool = True  # onnxruntime intra-op threads spin-wait between ops (its default); off: they sleep
    cache_dir: str | Path = field(default_factory=lambda: paths.cache_dir("bench"))  # converted models, reused
    figures_dir: str | None = None  # also write the plots here (e.g. docs/figures)
    figure_prefix: str = "bench_"
    progress: bool = True
    job_timeout_s: float = 3 * 3600
    command: str = ""  # the command line, recorded in the report

    def resolved(self) -> BenchOptions:
        """Apply --quick defaults and validate; raises InputError for bad options."""
        o = BenchOptions(**{k: (list(v) if isinstance(v, list) else v) for k, v in asdict(self).items()})
        if o.quick:
            if not (o.preset or o.checkpoint or o.artifacts):
                o.preset = "tiny"
            o.images = [n for n in o.images if n <= 2] or [1]
            o.new_tokens = min(o.new_tokens, 8)
            o.prompt_len = min(o.prompt_len, 32)
            o.repeats = min(o.repeats, 2)
            o.warmup = min(o.warmup, 1)
            o.export = False
            o.pipeline_recipes = ["fp32"]
            if o.threads == 0:  # one thread is robust on a shared machine (no OpenMP spin-wait contention)
                o.threads = 1
        if sum(x is not None for x in (o.preset, o.checkpoint)) > 1:
            raise InputError("give either --preset or --checkpoint, not both")
        if not (o.preset or o.checkpoint or o.artifacts):
            raise InputError("give --artifacts DIR, --preset NAME or --checkpoint DIR")
        for b in o.backends:
            if b not in BACKENDS:
                RUNTIME_BACKENDS.get(b)  # InputError for a name that is no backend at all
                raise InputError(f"backend {b!r} needs a GPU, which the bench does not plan for; choose from "
                                 f"{', '.join(BACKENDS)}")
        for a in o.anchors:
            if a not in DEFAULT_ANCHORS:
                raise InputError(f"unknown anchor {a!r}; choose from {', '.join(DEFAULT_ANCHORS)} (or none)")
        for m in o.modes:
            if m not in VISUAL_MODES and m not in PIPELINE_VARIANTS:
                raise InputError(f"unknown mode {m!r}; choose from {', '.join([*VISUAL_MODES, *PIPELINE_VARIANTS])}")
        for s in o.sections:
            if s not in SECTIONS:
                raise InputError(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
        if not o.images or any(n < 0 for n in o.images):
            raise InputError(f"--images must be image counts >= 0, got {o.images}")
        if o.pipeline_new_tokens is None or o.quick:
            o.pipeline_new_tokens = min(o.pipeline_new_tokens or o.new_tokens, o.new_tokens)
        if o.new_tokens < 2 or o.pipeline_new_tokens < 2:
            raise InputError("--new-tokens must be >= 2 (decode speed needs at least one step after the first token)")
        if o.prompt_len < 1:
            raise InputError("--prompt-len must be >= 1")
        if o.repeats < 1 or o.warmup < 0:
            raise InputError("--repeats must be >= 1 and --warmup >= 0")
        if o.threads < 0:
            raise InputError("--threads must be >= 0 (0 = all cores)")
        o.threads = o.threads or (os.cpu_count() or 1)
        if o.decoder is None:
            from maven_edge.export.genai_decoder import builder_unavailable

            o.decoder = "torch" if builder_unavailable() else "genai"
        if o.decoder not in ("genai", "torch"):
            raise InputError(f"unknown --decoder {o.decoder!r}; choose genai or torch")
        from maven_edge.calibration.quantize import QUANT_RECIPES

        for r in o.pipeline_recipes:
            if r != "fp32" and r not in QUANT_RECIPES:
                raise InputError(f"unknown --pipeline-recipes entry {r!r}; choose fp32 or one of "
                                 f"{', '.join(QUANT_RECIPES.names())}")
        if not o.pipeline_recipes:
            o.pipeline_recipes = ["fp32"]
        if o.llama_cpp_jobs < 1:
            raise InputError("--llama-cpp-jobs must be >= 1")
        return o


@dataclass
class BenchReport:
    options: dict[str, Any]
    machine: dict[str, Any]
    source: dict[str, Any]
    limits: dict[str, Any] | None
    pipeline: dict[str, Any]
    text: list[dict[str, Any]]
    ratios: dict[str, Any]
    roofline: list[dict[str, Any]]
    efficiency: dict[str, Any]
    notes: list[str]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    mtmd: dict[str, Any] = field(default_factory=dict)  # llama.cpp multimodal: precision -> result
    llama_cpp: dict[str, Any] = field(default_factory=dict)  # how llama.cpp was built (or why not)
    caches: dict[str, Any] = field(default_factory=dict)  # precision -> benchmarks.caches.measure

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- worker processes -----------------------------------------------------------------------------


class _Bars:
    """An outer bar over jobs and an inner bar over the current job's steps (tqdm)."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.outer = self.inner = None
        if enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.outer = tqdm(total=total, desc="bench", unit="job", position=0, dynamic_ncols=True)

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        self.outer.set_postfix_str(label)
        self.inner = self._tqdm(total=1, desc=f"  {label}", unit="step", position=1, leave=False, dynamic_ncols=True)

    def update(self, done: int, total: int, label: str) -> None:
        if self.inner is None:
            return
        self.inner.total = max(1, total)
        self.inner.n = done
        self.inner.set_postfix_str(label)
        self.inner.refresh()

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        if self.outer is not None:
            self.outer.update(1)

    def write(self, msg: str) -> None:
        if self.enabled:
            self._tqdm.write(msg)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.outer is not None:
            self.outer.close()


class Runner:
    """Runs worker jobs one after another (never two at once: they would share the cores)."""

    def __init__(self, out: Path, threads: int, bars: _Bars, timeout_s: float):
        self.jobs_dir = out / "jobs"
        self.logs_dir = out / "logs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.bars = bars
        self.timeout_s = timeout_s
        self.count = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        t = str(self.threads)
        env.update({"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"})
        return env

    def run(self, task: str, payload: dict[str, Any], label: str) -> dict[str, Any]:
        """Run one job; returns {"ok": bool, "result"|"error", "seconds", "log"}."""
        self.count += 1
        slug = f"{self.count:02d}-{''.join(c if c.isalnum() else '-' for c in label)}"
        job_path, result_path = self.jobs_dir / f"{slug}.json", self.jobs_dir / f"{slug}.result.json"
        log_path = self.logs_dir / f"{slug}.log"
        job_path.write_text(json.dumps({"task": task, **payload}, default=str))
        result_path.unlink(missing_ok=True)
        self.bars.start(label)
        t0 = time.perf_counter()
        from maven_edge.benchmarks.worker import PROGRESS

        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "maven_edge.benchmarks.worker", str(job_path), str(result_path)],
                                    stdout=subprocess.PIPE, stderr=log, text=True, env=self.env())
            assert proc.stdout is not None
            try:
                deadline = time.monotonic() + self.timeout_s
                for line in proc.stdout:
                    if line.startswith(PROGRESS):
                        try:
                            p = json.loads(line[len(PROGRESS):])
                            self.bars.update(p["done"], p["total"], p.get("label", ""))
                        except (ValueError, KeyError):
                            pass
                    else:
                        log.write(line)
                        log.flush()
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(proc.args, self.timeout_s)
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.bars.finish()
                return {"ok": False, "error": f"timed out after {self.timeout_s:.0f} s", "log": str(log_path),
                        "seconds": time.perf_counter() - t0}
            except BaseException:
                proc.kill()
                proc.wait()
                self.bars.finish()
                raise
        seconds = time.perf_counter() - t0
        self.bars.finish()
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            tail = log_path.read_text(errors="replace")[-1200:] if log_path.is_file() else ""
            result = {"ok": False, "error": f"the worker exited with code {proc.returncode} without a result "
                                            f"(killed for memory?); log tail:\n{tail}"}
        result["seconds"] = seconds
        result["log"] = str(log_path)
        return result


# ---- planning ---------------------------------------------------------------------------------------


def _source_spec(o: BenchOptions) -> tuple[dict[str, Any], str]:
    """(source job payload, cache key) for the model the run measures."""
    if o.checkpoint:
        path = str(Path(o.checkpoint).resolve())
        spec = {"checkpoint": path, "overrides": o.overrides or None}
        name = f"ckpt-{Path(path).name}"
    elif o.preset:
        spec = {"preset": o.preset, "overrides": o.overrides or None, "seed": o.seed}
        name = o.preset
    else:

        manifest = load_manifest(o.artifacts, verify=False)
        src = (manifest.extra or {}).get("source") or {}
        if src.get("kind") == "checkpoint" or ("checkpoint" in src and "kind" not in src):
            spec = {"checkpoint": src.get("path") or src.get("checkpoint"), "overrides": src.get("overrides")}
        elif src.get("kind") == "preset" or "preset" in src:
            spec = {"preset": src.get("preset") or manifest.preset, "overrides": src.get("overrides"),
                    "seed": src.get("seed")}
        else:
            spec = {}
        fp = (manifest.extra or {}).get("model_fingerprint", "")
        return spec, f"{manifest.preset}-{fp[:16] or 'unknown'}"
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return spec, f"{name}-{key}"


def _count_jobs(o: BenchOptions) -> int:
    n = 1  # source
    n += "roofline" in o.sections
    if o.export and not o.artifacts and ("ort" in o.backends or "text" in o.sections):
        n += 2
    if "caches" in o.sections:
        n += len([p for p in ("fp32", "int4") if p in _precisions(o, "ort")])
    if "pipeline" in o.sections:
        n += len(o.backends) + ("ort" in o.backends) * (len(o.pipeline_recipes) - 1)
        n += ("llamacpp" in o.anchors) * len(_precisions(o, "llamacpp"))
    if o.export and "ort" in o.backends:
        n += len(_recipes_to_make(o))
    if "text" in o.sections:
        for e in list(o.backends) + list(o.anchors):
            n += len(_precisions(o, e))
    return n


def _same_decoder(recipe: str, other: str) -> bool:
    from maven_edge.calibration.quantize import QUANT_RECIPES

    return QUANT_RECIPES.get(recipe).decoder == QUANT_RECIPES.get(other).decoder


def _recipes_to_make(o: BenchOptions) -> list[str]:
    """Our quantized artifact sets this run needs (pipeline recipes, and the text section's int8 rows)."""
    out = [r for r in o.pipeline_recipes if r != "fp32"] if "pipeline" in o.sections else []
    if "text" in o.sections:
        for precision, recipe in INT8_TEXT_RECIPES.items():
            if precision in _precisions(o, "ort") and not any(_same_decoder(r, recipe) for r in out):
                out.append(recipe)
    return out


def _precisions(o: BenchOptions, engine: str) -> list[str]:
    ps = list(ENGINE_PRECISIONS[engine])
    if o.precisions:
        alias = {"f32": "fp32"}
        want = {alias.get(p, p) for p in o.precisions}
        ps = [p for p in ps if p in want]
    if o.quick and engine in ("genai", "ort"):
        ps = [p for p in ps if p == "fp32"]
    if engine == "ort" and o.decoder != "genai":
        ps = [p for p in ps if p != "fp32-dynamo"]  # fp32 already is the torch.onnx decoder
    return ps


def _ort_config(o: BenchOptions) -> dict[str, str]:
    """onnxruntime session config entries every ORT job of the run gets."""
    return {} if o.ort_spinning else {"session.intra_op.allow_spinning": "0"}


def _llama_cpp(o: BenchOptions, log: Any) -> dict[str, Any]:
    """Build (or reuse) llama.cpp's tools when the llamacpp anchor is in this run."""
    if "llamacpp" not in o.anchors or not ({"text", "pipeline"} & set(o.sections)):
        return {}
    from maven_edge.benchmarks.anchors.llama_cpp_build import ensure_build

    build = ensure_build(Path(o.cache_dir), o.llama_cpp_src, o.llama_cpp_jobs, log=log)
    return build.describe()


def run_bench(options: BenchOptions) -> BenchReport:
    """Run the suite and write JSON, CSV, Markdown and plots into ``options.out``."""
    o = options.resolved()
    t_start = time.perf_counter()
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    machine = machine_info(o.threads)
    bars = _Bars(_count_jobs(o), o.progress)
    runner = Runner(out, o.threads, bars, o.job_timeout_s)
    bars.write(f"machine: {describe_machine(machine)}")
    try:
        source_spec, key = _source_spec(o)
        work = Path(o.cache_dir) / key
        work.mkdir(parents=True, exist_ok=True)

        # -- the model, the HF-format decoder, our artifacts --------------------------------------
        source: dict[str, Any] = {"spec": source_spec, "work_dir": str(work)}
        needs_ort = "ort" in o.backends and bool({"pipeline", "text", "caches"} & set(o.sections))
        wants_mtmd = "pipeline" in o.sections and "llamacpp" in o.anchors
        save_checkpoint = ("text" in o.sections and "torch" in o.backends) or wants_mtmd
        save_hf = ("text" in o.sections and bool(o.anchors)) or wants_mtmd
        if source_spec:
            r = runner.run("source", {**source_spec, "work_dir": str(work), "threads": o.threads,
                                      "save_checkpoint": save_checkpoint, "save_hf": save_hf}, "source model")
            if not r["ok"]:
                raise BackendError(f"could not build the source model: {r['error']} (log: {r['log']})")
            source.update(r["result"])
        else:
            notes.append("the artifacts' manifest does not name its source model: anchors and the torch backend "
                         "need it and are skipped")
        artifacts: dict[str, str] = {}
        if o.artifacts:

            m = load_manifest(o.artifacts, verify=False)
            artifacts[m.recipe if m.recipe in ("fp32", "int4") else m.recipe] = str(Path(o.artifacts).resolve())
            fp = (m.extra or {}).get("model_fingerprint")
            if source.get("fingerprint") and fp and fp != source["fingerprint"]:
                notes.append("the artifacts' weights differ from the source model their manifest names: anchors run "
                             "other weights than ORT; ratios are still speed ratios of the same geometry")
            source.setdefault("config", m.config)
            source.setdefault("preset", m.preset)
        if o.int4_artifacts:
            artifacts["int4"] = str(Path(o.int4_artifacts).resolve())
        # Our artifacts per ort "precision": fp32 / int4 with the chosen decoder; with --decoder genai
        # also the torch.onnx decoder (fp32-dynamo), so the report shows which decoder wins.
        wanted = {"fp32": (o.decoder, "onnx-fp32" if o.decoder == "torch" else "onnx-fp32-genai")}
        if ("text" in o.sections or "caches" in o.sections) and "ort" in o.backends:
            if o.decoder == "genai" and "int4" in _precisions(o, "ort"):
                wanted["int4"] = ("genai-int4", "onnx-int4-genai")
            if "fp32-dynamo" in _precisions(o, "ort"):
                wanted["fp32-dynamo"] = ("torch", "onnx-fp32")
        for key, (decoder, dirname) in wanted.items():
            if key in artifacts or not needs_ort or not source.get("fingerprint"):
                continue
            cached_dir = work / dirname
            if not (o.export or (cached_dir / "manifest.json").is_file()):
                if key == "fp32":
                    notes.append("no ONNX artifacts for the ort backend (exporting is off with --quick / --no-export: "
                                 "pass --artifacts DIR, or run once without them to export into the cache)")
                continue
            r = runner.run("export", {"out": str(cached_dir), "source": source_spec, "build": o.export,
                                      "reexport": o.reexport, "decoder": decoder,
                                      "fingerprint": source["fingerprint"], "threads": o.threads},
                           f"export ONNX (ours, {key}, decoder {decoder})")
            if r["ok"] and r["result"]["artifacts"] is None:
                notes.append(f"the cached ONNX export ({key}) holds other weights and exporting is off (--no-export / "
                             "--quick): skipped")
            elif r["ok"]:
                artifacts[key] = r["result"]["artifacts"]
                if key == "fp32":
                    source["export_s"] = r["result"]["seconds"]
            else:
                notes.append(f"our ONNX export ({key}) failed: {r['error'].splitlines()[0]} (log: {r['log']})")
        if ("int4" not in artifacts and o.decoder == "torch" and "fp32" in artifacts and "int4" in _precisions(o, "ort")
                and "text" in o.sections and "ort" in o.backends):
            int4_dir = work / "onnx-int4"
            if o.export or (int4_dir / "manifest.json").is_file():
                r = runner.run("quantize", {"fp32": artifacts["fp32"], "out": str(int4_dir), "force": o.reexport},
                               "quantize int4 (ours)")
                if r["ok"]:
                    artifacts["int4"] = r["result"]["artifacts"]
                else:
                    notes.append(f"int4 quantization failed: {r['error'].splitlines()[0]} (log: {r['log']})")
        recipes = _recipes_to_make(o)
        if "fp32" in artifacts and needs_ort and not o.artifacts:
            for recipe in recipes:
                rdir = work / f"onnx-{recipe}-{o.decoder}"
                if not (o.export or (rdir / "manifest.json").is_file()):
                    continue
                r = runner.run("quantize", {"fp32": artifacts["fp32"], "out": str(rdir), "recipe": recipe,
                                            "force": o.reexport}, f"quantize {recipe} (ours)")
                if r["ok"]:
                    artifacts[recipe] = r["result"]["artifacts"]
                else:
                    notes.append(f"recipe {recipe} failed: {r['error'].splitlines()[0]} (log: {r['log']})")
        for precision, recipe in INT8_TEXT_RECIPES.items():  # a text row reuses a recipe with its decoder
            made = next((artifacts[r] for r in recipes if r in artifacts and _same_decoder(r, recipe)), None)
            if made and precision not in artifacts:
                artifacts[precision] = made
        source["artifacts"] = artifacts

        # -- llama.cpp, built once from source -------------------------------------------------------
        llama_cpp = _llama_cpp(o, bars.write)
        if llama_cpp.get("error"):
            notes.append(f"llama.cpp is not measured in this run: {llama_cpp['error'].splitlines()[0]}")

        # -- the machine's limits --------------------------------------------------------------------
        limits = None
        if "roofline" in o.sections and not o.prepare_only:
            small = o.quick
            r = runner.run("limits", {"threads": o.threads, "copy_mb": 64 if small else 512,
                                      "matmul_size": 1024 if small else 2048, "repeats": 3 if small else 7},
                           "machine limits")
            if r["ok"]:
                limits = r["result"]
            else:
                notes.append(f"machine limits failed: {r['error']}")

        # -- the multimodal pipeline ----------------------------------------------------------------------
        pipeline: dict[str, Any] = {}
        if "pipeline" in o.sections and not o.prepare_only:
            for backend in o.backends:
                payload = {"backend": backend, "threads": o.threads, "modes": o.modes, "images": o.images,
                           "ort_config": _ort_config(o),
                           "new_tokens": o.pipeline_new_tokens, "warmup": o.warmup, "repeats": o.repeats, "seed": 0}
                if backend == "torch":
                    if not source_spec:
                        pipeline[backend] = {"status": "unavailable", "reason": "no source model"}
                        bars.finish()
                        continue
                    payload["checkpoint"] = source.get("checkpoint")
                    payload["source"] = source_spec
                    r = runner.run("pipeline", payload, f"pipeline {backend}")
                    pipeline[backend] = ({"status": "measured", **r["result"]} if r["ok"] else
                                         {"status": "failed", "reason": r["error"], "log": r["log"]})
                    continue
                recipes = ["fp32"] if (o.artifacts or backend != "ort") else o.pipeline_recipes
                for recipe in recipes:
                    key = backend if recipe == "fp32" else f"{backend}/{recipe}"
                    chosen = (str(Path(o.artifacts).resolve()) if o.artifacts and recipe == "fp32"
                              else artifacts.get(recipe))
                    if not chosen:
                        pipeline[key] = {"status": "unavailable", "reason": f"no {recipe} ONNX artifacts"}
                        bars.finish()
                        continue
                    r = runner.run("pipeline", {**payload, "artifacts": chosen}, f"pipeline {key}")
                    pipeline[key] = ({"status": "measured", "recipe": recipe, **r["result"]} if r["ok"] else
                                     {"status": "failed", "recipe": recipe, "reason": r["error"], "log": r["log"]})
        mtmd: dict[str, Any] = {}
        if "pipeline" in o.sections and not o.prepare_only and "llamacpp" in o.anchors:
            for precision in _precisions(o, "llamacpp"):
                if not llama_cpp.get("bin_dir") or not source.get("checkpoint") or not source.get("hf_dir"):
                    mtmd[precision] = {"status": "unavailable",
                                       "reason": llama_cpp.get("error") or "no source checkpoint to convert"}
                    bars.finish()
                    continue
                cfg_pre = (source.get("config") or {}).get("preprocess", {})
                r = runner.run("mtmd", {"bin_dir": llama_cpp["bin_dir"], "work_dir": str(work),
                                        "hf_dir": source["hf_dir"], "checkpoint": source["checkpoint"],
                                        "precision": precision, "images": o.images, "threads": o.threads,
                                        "new_tokens": o.pipeline_new_tokens, "warmup": o.warmup,
                                        "repeats": o.repeats, "image_size": int(cfg_pre.get("image_size", 224))},
                               f"llama.cpp mtmd {precision}")
                mtmd[precision] = ({"status": "measured", **r["result"]} if r["ok"] else
                                   {"status": "failed", "reason": r["error"], "log": r["log"]})

        # -- caches and continuous batching (ort, the shared-buffer decoder) -------------------------------
        caches: dict[str, Any] = {}
        if "caches" in o.sections and not o.prepare_only:
            for precision in [p for p in ("fp32", "int4") if p in _precisions(o, "ort")]:
                art = artifacts.get(precision)
                if not art:
                    caches[precision] = {"status": "unavailable", "reason": f"no {precision} ONNX artifacts"}
                    bars.finish()
                    continue
                r = runner.run("caches", {"artifacts": art, "threads": o.threads, "images": 4,
                                          "new_tokens": o.new_tokens, "repeats": o.repeats}, f"caches {precision}")
                caches[precision] = ({"status": "measured", **r["result"]} if r["ok"] else
                                     {"status": "failed", "reason": r["error"], "log": r["log"]})

        # -- text generation: ours and the anchors --------------------------------------------------------
        text: list[dict[str, Any]] = []
        if "text" in o.sections:
            id_high = max(1, int(source.get("tokenizer_size", 256)) - 16)
            spec = {"prompt_len": o.prompt_len, "new_tokens": o.new_tokens, "warmup": o.warmup, "repeats": o.repeats,
                    "threads": o.threads, "seed": 0, "id_high": id_high}
            ctx = {"work_dir": str(work), "hf_dir": source.get("hf_dir"), "checkpoint": source.get("checkpoint"),
                   "artifacts": artifacts, "threads": o.threads,
                   "extra": {"ort_config": _ort_config(o), "llama_cpp_bin": llama_cpp.get("bin_dir"), "llama_cpp_error": llama_cpp.get("error"),
                             "llama_cpp_build": llama_cpp}}
            for engine in [b for b in o.backends] + list(o.anchors):
                for precision in _precisions(o, engine):
                    r = runner.run("text", {"engine": engine, "precision": precision, "ctx": ctx, "spec": spec,
                                            "prepare_only": o.prepare_only}, f"text {engine} {precision}")
                    if r["ok"]:
                        row = r["result"]
                    else:
                        row = {"engine": engine, "precision": precision, "status": "failed",
                               "reason": r["error"].splitlines()[0] if r["error"] else "", "log": r["log"]}
                    row.setdefault("engine", engine)
                    row.setdefault("precision", precision)
                    row["job_s"] = r.get("seconds")
                    text.append(row)
                    if row.get("status") not in ("measured", "prepared"):
                        bars.write(f"text {engine} {precision}: {row.get('status')} ({row.get('reason', '')})")
    finally:
        bars.close()

    from maven_edge.benchmarks.report import analyse, write_outputs

    load = machine.get("load_average")
    cores = machine.get("logical_cores") or 1
    if load and load[0] > cores:
        notes.append(f"the machine was busy when the run started (load average {load[0]} on {cores} logical cores): "
                     "other processes shared the cores, so times are slower and noisier than on an idle machine")
    report = BenchReport(options={**asdict(o), "out": str(o.out), "cache_dir": str(o.cache_dir)}, machine=machine,
                         source=source, limits=limits, pipeline=pipeline, text=text, ratios={}, roofline=[],
                         efficiency={}, notes=notes, seconds=0.0, mtmd=mtmd, llama_cpp=llama_cpp, caches=caches)
    analyse(report, o)
    report.seconds = time.perf_counter() - t_start
    write_outputs(report, out, figures_dir=o.figures_dir, prefix=o.figure_prefix)
    return report

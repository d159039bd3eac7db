"""The GPU self-test: one command that exercises every GPU path on a machine that has one.

    maven-edge selftest --gpu                      # Jetson (JetPack 6.x) or a desktop GPU, < 10 minutes planned
    maven-edge selftest --gpu --plan-only          # what it would do here, without running anything

No GPU path of maven-edge has run in the project's CI (it has no GPU); this is how they are
checked. On the machine it runs on it:

1. exports the shipped tiny checkpoint (opset for the installed TensorRT: 17 on 8.6), and makes
   the ``fp16`` and ``int8-trt`` (symmetric Q/DQ) quantized sets (`--artifacts` skips the export);
2. builds TensorRT engines twice — FP16 and INT8 — with the recipe the installed TensorRT supports
   (``fp16`` from the fp32 files and ``int8`` from the int8-trt files on 8.6 - 10.x; ``typed`` from
   the fp16 / int8-trt files on 11.x);
3. answers the same test questions (default 50, greedy) with onnxruntime on the CPU (fp32, the
   reference), the trt backend on both engine sets, and onnxruntime's CUDA and TensorRT execution
   providers where this onnxruntime has them;
4. prints one table: per backend, how many answers have exactly the reference's greedy tokens and
   the same first token, the median time to first token and decode time per token, and errors.

Without a GPU (no TensorRT / cuda-python / CUDA device, and no GPU provider in onnxruntime) it
prints why and what to install, and exits 0 without doing anything (``--require-gpu``: exit 2).
The planning, the environment probe and the table are plain Python and tested without a GPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maven_edge.calibration.trt_support import ENGINE_RECIPES, parse_trt_version

DEFAULT_QUESTIONS = 50
DEFAULT_NEW_TOKENS = 16


@dataclass
class GpuEnv:
    """What this machine offers for the GPU paths (:func:`probe_environment`)."""

    gpu: dict[str, Any] | None = None
    gpu_error: str | None = None
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    onnxruntime: str | None = None
    providers: list[str] = field(default_factory=list)
    ort_distributions: list[str] = field(default_factory=list)

    @property
    def trt_ready(self) -> bool:
        return self.gpu is not None and self.tensorrt is not None

    def has_provider(self, ort_name: str) -> bool:
        return ort_name in self.providers


def probe_environment() -> GpuEnv:
    """TensorRT, cuda-python + a CUDA device, onnxruntime's providers; never raises."""
    env = GpuEnv()
    try:
        import tensorrt

        env.tensorrt = str(tensorrt.__version__)
    except Exception as exc:  # ImportError, or a broken install that cannot load libnvinfer
        env.tensorrt_error = f"no tensorrt ({exc})"
    try:
        from maven_edge.calibration.trt_runtime import Cuda, _import_cudart

        _import_cudart()
    except Exception:  # BackendError: cuda-python is not installed
        env.gpu_error = "no cuda-python"
    else:
        try:
            cuda = Cuda(0)
            env.gpu = cuda.properties()
            cuda.close()
        except Exception as exc:  # no driver, no device
            env.gpu_error = f"no CUDA device ({exc})"
    try:
        import onnxruntime as ort

        from maven_edge.runtime.backends.providers import ort_distributions

        env.onnxruntime = ort.__version__
        env.providers = list(ort.get_available_providers())
        env.ort_distributions = ort_distributions()
    except Exception as exc:  # onnxruntime missing or broken
        env.onnxruntime = f"unavailable ({exc})"
    return env


@dataclass
class Prep:
    """One preparation step: export, quantize or build-trt."""

    name: str  # key of what it produces: fp32, fp16, int8-trt, engines-fp16, engines-int8
    what: str  # human-readable
    kind: str  # export | quantize | build
    recipe: str | None = None  # quantize recipe / build-trt precision
    source: str | None = None  # key of the input


@dataclass
class Run:
    """One backend answering the questions."""

    name: str
    artifacts: str  # key of a Prep
    backend: str  # ort | trt
    providers: tuple[str, ...] = ("cpu",)
    skip: str | None = None  # why it cannot run here


@dataclass
class SelftestPlan:
    prep: list[Prep]
    runs: list[Run]
    target_trt: str | None
    skipped: str | None = None  # the whole self-test cannot run here: why

    def describe(self) -> str:
        rows = [f"self-test plan (export target TensorRT: {self.target_trt or 'none'})"]
        rows += [f"  prepare {p.name}: {p.what}" for p in self.prep]
        rows += [f"  run {r.name}: {r.backend} on {r.artifacts}" + (f" (providers {','.join(r.providers)})"
                                                                   if r.backend == "ort" else "")
                 + (f" - skipped: {r.skip}" if r.skip else "") for r in self.runs]
        if self.skipped:
            rows.append(f"  SKIPPED: {self.skipped}")
        return "\n".join(rows)


INSTALL_HINT = ("on a machine with an NVIDIA GPU: TensorRT (JetPack ships it; desktop: pip install -c constraints.txt "
                "-e \".[tensorrt]\") and cuda-python for --backend trt, and/or onnxruntime-gpu in place of onnxruntime "
                "(pip uninstall -y onnxruntime && pip install onnxruntime-gpu) for the CUDA / TensorRT providers; see "
                "docs/usage/quantization.md")


def plan_selftest(env: GpuEnv, have_artifacts: bool = False) -> SelftestPlan:
    """What the self-test does on a machine like `env`."""
    target = None
    if env.tensorrt:
        v = parse_trt_version(env.tensorrt)
        target = f"{v[0]}.{v[1]}"
    prep: list[Prep] = [] if have_artifacts else [Prep("fp32", "export the shipped tiny checkpoint" + (
        f" for TensorRT {target}" if target else ""), "export")]
    runs = [Run("cpu fp32 (reference)", "fp32", "ort", ("cpu",))]
    trt_skip = None
    if not env.trt_ready:
        trt_skip = "; ".join(e for e in (env.tensorrt_error, env.gpu_error) if e) or "no TensorRT / GPU"
    else:
        weak = ENGINE_RECIPES.get("fp16").supports(env.tensorrt)
        prep.append(Prep("int8-trt", "quantize --recipe int8-trt (symmetric Q/DQ)", "quantize", "int8-trt", "fp32"))
        if weak:
            prep.append(Prep("engines-fp16", "build-trt --precision fp16 from the fp32 files", "build", "fp16", "fp32"))
            prep.append(Prep("engines-int8", "build-trt --precision int8 from the int8-trt files", "build", "int8",
                             "int8-trt"))
        else:
            prep.insert(1, Prep("fp16", "quantize --recipe fp16", "quantize", "fp16", "fp32"))
            prep.append(Prep("engines-fp16", "build-trt --precision typed from the fp16 files", "build", "typed",
                             "fp16"))
            prep.append(Prep("engines-int8", "build-trt --precision typed from the int8-trt files", "build", "typed",
                             "int8-trt"))
    runs.append(Run("trt fp16 engines", "engines-fp16", "trt", skip=trt_skip))
    runs.append(Run("trt int8 engines", "engines-int8", "trt", skip=trt_skip))
    no_ort_gpu = (" (onnxruntime here has " + ", ".join(env.providers) + ")") if env.providers else ""
    runs.append(Run("ort cuda fp32", "fp32", "ort", ("cuda",),
                    None if env.has_provider("CUDAExecutionProvider") else "no CUDAExecutionProvider" + no_ort_gpu))
    runs.append(Run("ort tensorrt-ep fp32", "fp32", "ort", ("tensorrt",),
                    None if env.has_provider("TensorrtExecutionProvider") else "no TensorrtExecutionProvider"
                    + no_ort_gpu))
    skipped = None
    if all(r.skip for r in runs[1:]):
        skipped = (f"no GPU path can run here: {trt_skip}; onnxruntime {env.onnxruntime} has no CUDA / TensorRT "
                   f"provider. It needs, {INSTALL_HINT}")
    return SelftestPlan(prep, runs, target, skipped)


# ---- results ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    setup_s: float = 0.0  # building the engines it runs + loading
    questions: int = 0
    identical: int = 0  # answers with exactly the reference's greedy tokens
    first_token: int = 0  # answers whose first token matches the reference's
    ttft_ms: float | None = None  # median
    decode_ms_per_token: float | None = None  # median over answers of the mean decode step
    status: str = "ok"  # ok | skipped: ... | error: ...
    tokens: list[list[int]] = field(default_factory=list, repr=False)


def compare_tokens(result: RunResult, reference: list[list[int]]) -> None:
    result.identical = sum(a == b for a, b in zip(result.tokens, reference, strict=False))
    result.first_token = sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(result.tokens, reference,
                                                                                   strict=False))


def render_table(results: list[RunResult], header: str = "") -> str:
    """The one table the self-test prints."""
    cols = ["backend", "setup s", "identical", "1st token", "TTFT ms", "decode ms/tok", "status"]
    rows = []
    for r in results:
        n = r.questions or 0
        done = r.status == "ok"
        rows.append([r.name, f"{r.setup_s:.1f}" if done else "-",
                     f"{r.identical}/{n}" if done else "-", f"{r.first_token}/{n}" if done else "-",
                     f"{r.ttft_ms:.1f}" if done and r.ttft_ms is not None else "-",
                     f"{r.decode_ms_per_token:.2f}" if done and r.decode_ms_per_token is not None else "-",
                     r.status])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [header] if header else []
    out += [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


# ---- running it (needs the GPU for everything but the reference) -------------------------------------


@dataclass
class SelftestOptions:
    work: Path
    questions: int = DEFAULT_QUESTIONS
    new_tokens: int = DEFAULT_NEW_TOKENS
    artifacts: str | None = None  # an fp32 export to use instead of exporting here
    max_seq: int = 512


def _prepare(step: Prep, opts: SelftestOptions, made: dict[str, Path], log: Callable[[str], None],
             target: str | None) -> float:
    t0 = time.perf_counter()
    out = opts.work / step.name
    if step.kind == "export":
        from maven_edge.export.onnx_export import ExportOptions, export_model
        from maven_edge.model_src.checkpoint import load_model
        from maven_edge.model_src.resources import shipped_checkpoint

        export_model(load_model(shipped_checkpoint()), ExportOptions(out=out, force=True, progress=False,
                                                                     target_trt=target))
    elif step.kind == "quantize":
        from maven_edge.calibration.quantize import QuantizeOptions, quantize_artifacts

        quantize_artifacts(made[step.source or "fp32"], out, QuantizeOptions(recipe=step.recipe or "", force=True,
                                                                             progress=False, calib_samples=16))
    else:
        from maven_edge.calibration.tensorrt import TrtBuildOptions, build_engines

        build_engines(TrtBuildOptions(made[step.source or "fp32"], out, precision=step.recipe or "fp16",
                                      max_seq=opts.max_seq, calib_samples=16, progress=False))
    made[step.name] = out
    seconds = time.perf_counter() - t0
    log(f"{step.name}: {step.what} in {seconds:.1f} s")
    return seconds


def _answer(run: Run, path: Path, opts: SelftestOptions, samples: list[Any]) -> RunResult:
    from maven_edge.runtime.pipeline import MavenPipeline

    res = RunResult(run.name)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"providers": list(run.providers)} if run.backend == "ort" else {}
    pipe = MavenPipeline.from_artifacts(path, backend=run.backend, **kwargs)
    pipe.generate(samples[0].images, samples[0].prompt, max_new_tokens=2, greedy=True)  # warm-up (engine builds)
    res.setup_s = time.perf_counter() - t0
    ttft, step = [], []
    for s in samples:
        out = pipe.generate(s.images, s.prompt, max_new_tokens=opts.new_tokens, greedy=True)
        res.tokens.append(list(out.token_ids))
        ttft.append(out.timings.ttft_ms)
        if out.timings.decode_step_ms:
            step.append(statistics.fmean(out.timings.decode_step_ms))
    res.questions = len(samples)
    res.ttft_ms = statistics.median(ttft) if ttft else None
    res.decode_ms_per_token = statistics.median(step) if step else None
    return res


def run_selftest(opts: SelftestOptions, env: GpuEnv | None = None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> tuple[SelftestPlan,
                                                                                         list[RunResult]]:
    """Run the plan; every step's failure is recorded in its row, not raised."""
    from maven_edge.model_src.data import get_sample

    env = env or probe_environment()
    plan = plan_selftest(env, have_artifacts=opts.artifacts is not None)
    if plan.skipped:
        return plan, []
    opts.work.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {"fp32": Path(opts.artifacts)} if opts.artifacts else {}
    prep_error: dict[str, str] = {}
    prep_seconds: dict[str, float] = {}
    for step in plan.prep:
        if step.source and step.source in prep_error:
            prep_error[step.name] = prep_error[step.source]
            continue
        try:
            prep_seconds[step.name] = _prepare(step, opts, made, log, plan.target_trt)
        except Exception as exc:  # every failure goes into the table
            prep_error[step.name] = f"{step.name}: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
    from maven_edge.core.manifest import load_manifest

    cfg = load_manifest(made["fp32"]).maven_config() if "fp32" in made else None
    size, patch = (cfg.vision.image_size, cfg.vision.patch_size) if cfg else (64, 8)
    samples = [get_sample("test", i, image_size=size, patch_size=patch) for i in range(opts.questions)]
    results: list[RunResult] = []
    reference: list[list[int]] | None = None
    for run in plan.runs:
        if run.skip:
            results.append(RunResult(run.name, status=f"skipped: {run.skip}"))
            continue
        if run.artifacts in prep_error or run.artifacts not in made:
            results.append(RunResult(run.name, status=f"error: {prep_error.get(run.artifacts, 'not prepared')}"))
            continue
        try:
            res = _answer(run, made[run.artifacts], opts, samples)
            res.setup_s += prep_seconds.get(run.artifacts, 0.0) if run.backend == "trt" else 0.0
        except Exception as exc:  # the row says what failed
            res = RunResult(run.name, status=f"error: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        if reference is None and res.status == "ok":
            reference = res.tokens
        if reference is not None:
            compare_tokens(res, reference)
        results.append(res)
        log(f"{run.name}: {res.status}")
    return plan, results


def write_results(path: Path, env: GpuEnv, plan: SelftestPlan, results: list[RunResult], table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"env": asdict(env), "plan": plan.describe(), "table": table,
            "results": [asdict(r) | {"tokens": None} for r in results]}
    path.write_text(json.dumps(data, indent=2) + "\n")

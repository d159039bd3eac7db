"""`maven-edge bench` and `maven-edge quantize-report` (nothing heavy imported here)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from maven_edge.calibration.quantize import QUANT_RECIPES
from maven_edge.core.cliutil import add_command
from maven_edge.core.errors import InputError

ANCHOR_NAMES = ("hf", "genai", "optimum", "llamacpp")


def _list(kind: str, cast=str):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind == "anchors" and items in (["none"], []):
            return []
        try:
            return [cast(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{kind} must be a comma-separated list, got {text!r}") from None

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "bench",
        examples=["maven-edge bench --quick --out bench/quick",
                  "maven-edge bench --artifacts artifacts/tiny --anchors none --images 1,4 --out bench/tiny",
                  "maven-edge bench --preset edge-small --sections pipeline --modes hybrid,continuous --out bench/edge"],
        help="benchmark latency, TTFT, decode speed and memory against transformers, onnxruntime-genai, "
        "Optimum and llama.cpp",
        description="Per-stage latency of the multimodal pipeline (ort and torch backends, hybrid / continuous / "
        "discrete, 1..8 images), text decode speed of our runtime and of the anchors on the same weights, the "
        "machine's bandwidth and FLOP/s roofline, and the hybrid-vs-continuous efficiency. Writes results.json, "
        "CSV files, summary.md and bench_*.png into --out.",
    )
    src = p.add_argument_group("model (one of)")
    src.add_argument("--artifacts", metavar="DIR", help="exported artifact directory (its manifest names the source model)")
    src.add_argument("--preset", help="seeded random weights of a preset: tiny, edge-small, paper")
    src.add_argument("--checkpoint", metavar="DIR", help="maven-edge checkpoint directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --preset/--checkpoint, e.g. --set llm.num_layers=4 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="weight seed for --preset (default: the config's seed)")
    p.add_argument("--int4-artifacts", help="int4 artifacts of the same model (default: made with the int4-weight "
                   "recipe, cached)")
    p.add_argument("--backends", type=_list("backends"), default=None,
                   help="our backends to measure: ort,torch (default both)")
    p.add_argument("--images", type=_list("images", int), default=None, help="image counts (default 1,2,4,8)")
    p.add_argument("--modes", type=_list("modes"), default=None,
                   help="visual modes (default hybrid,continuous,discrete); also hybrid-context: hybrid with h_eos "
                   "read inside the prefill (--h-eos context)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (default 64)")
    p.add_argument("--pipeline-new-tokens", type=int, default=None,
                   help="new tokens per multimodal pipeline request (default: --new-tokens)")
    p.add_argument("--prompt-len", type=int, default=None, help="text-protocol prompt tokens (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="measured runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured warm-up runs (default 1)")
    p.add_argument("--anchors", type=_list("anchors"), default=None,
                   help="anchors: hf,genai,optimum,llamacpp or none (default all; --quick: hf)")
    p.add_argument("--precisions", type=_list("precisions"), default=None,
                   help="restrict engines to these precisions, e.g. fp32 or fp32,int4,q4_0")
    p.add_argument("--sections", type=_list("sections"), default=None,
                   help="roofline,pipeline,text (default all)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine (default: all cores; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="a small run (tiny preset unless a model is given, images 1,2, 8 new tokens, 32-token prompt, "
                   "2 repeats, 1 thread, anchors hf, no export): under 2 minutes")
    p.add_argument("--decoder", choices=("genai", "torch"), default=None,
                   help="how our decoder.onnx is made for the ort backend: genai (onnxruntime-genai's model builder, "
                   "fused GroupQueryAttention + shared KV buffer; int4 = its MatMulNBits build) or torch (torch.onnx; "
                   "int4 = our int4-weight quantizer). Default genai when onnxruntime-genai is installed. With genai "
                   "the torch.onnx decoder is also measured (ort fp32-dynamo) so the choice shows in the report")
    p.add_argument("--pipeline-recipes", type=_list("pipeline-recipes"), default=None,
                   help="our artifact sets the ort pipeline runs: fp32 and/or quantization recipes made here "
                   "(default fp32,vision-int8,latency-int8,latency-int4; --quick: fp32)")
    p.add_argument("--llama-cpp-src", default=None, metavar="PATH",
                   help="llama.cpp sources to build the llamacpp anchor from: a checkout, an unpacked "
                   "llama-cpp-python sdist or its .tar.gz (default: $MAVEN_EDGE_LLAMA_CPP_SRC, else the "
                   "llama-cpp-python sdist fetched with pip download); built once into the cache directory")
    p.add_argument("--llama-cpp-jobs", type=int, default=None, help="compile jobs for that build (default 2)")
    p.add_argument("--ort-no-spin", action="store_true",
                   help="onnxruntime's intra-op threads sleep instead of spin-waiting between ops (session config "
                   "session.intra_op.allow_spinning=0): faster on a machine other processes share")
    p.add_argument("--no-export", action="store_true", help="never export / quantize artifacts (use the cache only)")
    p.add_argument("--reexport", action="store_true",
                   help="redo our ONNX export and int4 quantization even when the cache holds the same weights (after "
                   "an exporter change)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build the cache (checkpoints, our export, each anchor's converted model); measure nothing")
    p.add_argument("--cache-dir", default=None, help="where converted models are kept (default: bench/ in the user cache directory)")
    p.add_argument("--figures-dir", default=None, help="also copy the plots here (e.g. docs/figures)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print the ratios and file paths as JSON at the end")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run_bench_command)

    r = add_command(subparsers, "quantize-report", help="accuracy / size / latency report of every recipe (docs/)",
                       examples=["maven-edge quantize-report --artifacts artifacts/tiny --out /tmp/qreport --limit 90 "
                                 "--sections accuracy",
                                 "maven-edge quantize-report --render-only docs/quantization.json"],
                       description="Quantize the fp32 artifacts with every recipe, evaluate each on the test "
                       "split through the runtime pipeline and write docs/quantization.md + .json.")
    r.add_argument("--artifacts", default=None, metavar="DIR", help="fp32 artifacts of the model to evaluate (tiny)")
    r.add_argument("--render-only", default=None, metavar="JSON",
                   help="only re-write the markdown from an existing quantization.json")
    r.add_argument("--out", metavar="DIR",
                   help="where quantization.md and quantization.json go (the project's: docs); required unless "
                   "--render-only")
    r.add_argument("--work", default=None,
                   help="where the quantized artifacts go (default: quant-report/ in the user cache directory)")
    r.add_argument("--recipes", default=",".join(QUANT_RECIPES.names()),
                   help=f"comma-separated (default {','.join(QUANT_RECIPES.names())})")
    r.add_argument("--split", default="test", choices=("train", "val", "test"), help="data split (default test)")
    r.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer per question (default 64, as maven-edge eval)")
    r.add_argument("--edge-artifacts", default=None, metavar="DIR",
                   help="fp32 artifacts of edge-small: adds the decoder size and decode-step latency section")
    r.add_argument("--edge-recipes", default="int4-weight,int8-dynamic", help="recipes for the edge-small section (default int4-weight,int8-dynamic)")
    r.add_argument("--sections", default="accuracy,calib,edge",
                   help="what to measure (default all); a subset updates the quantization.json in --out")
    r.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    r.add_argument("--reuse", action="store_true", help="reuse quantized artifacts already in --work")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_report)

    st = add_command(
        subparsers, "selftest",
        examples=["maven-edge selftest --gpu --plan-only",
                  "maven-edge selftest --gpu --questions 20 --require-gpu",
                  "maven-edge selftest --gpu --artifacts artifacts/tiny --json selftest.json"],
        help="check the GPU paths on this machine: TensorRT engines and the CUDA/TensorRT providers "
        "against CPU fp32 (docs/usage/quantization.md)",
        description="Export the shipped tiny model, build FP16 and INT8 TensorRT engines, answer test questions "
        "with the trt backend and onnxruntime's CUDA / TensorRT execution providers, compare greedy tokens with "
        "CPU fp32, and print one table (TTFT and decode time per backend). Without a GPU it says why and exits 0.")
    st.add_argument("--gpu", action="store_true", required=True, help="the GPU self-test (the only one)")
    st.add_argument("--questions", type=int, default=50, help="test questions per backend (default 50)")
    st.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)")
    st.add_argument("--artifacts", default=None, metavar="DIR",
                    help="an fp32 export to use instead of exporting here (default: export the shipped tiny model)")
    st.add_argument("--work", default=None, help="working folder (default: the maven-edge cache, selftest/)")
    st.add_argument("--plan-only", action="store_true", help="print what would run here and exit")
    st.add_argument("--require-gpu", action="store_true", help="exit 2 (not 0) when no GPU path can run here")
    st.add_argument("--json", default=None, metavar="FILE", help="also write the results here (default <work>/selftest.json)")
    st.set_defaults(func=_selftest)


def command_line(args: argparse.Namespace) -> str:
    """The command as given (options left at their defaults are not repeated)."""
    parts = ["maven-edge", "bench"]
    for flag, value in (("--artifacts", args.artifacts), ("--preset", args.preset), ("--checkpoint", args.checkpoint),
                        ("--seed", args.seed), ("--int4-artifacts", args.int4_artifacts)):
        if value is not None:
            parts += [flag, str(value)]
    for o in args.overrides:
        parts += ["--set", o]
    if args.quick:
        parts.append("--quick")
    for flag, value in (("--backends", args.backends), ("--images", args.images), ("--modes", args.modes),
                        ("--anchors", args.anchors), ("--precisions", args.precisions), ("--sections", args.sections),
                        ("--new-tokens", args.new_tokens), ("--pipeline-new-tokens", args.pipeline_new_tokens),
                        ("--prompt-len", args.prompt_len),
                        ("--repeats", args.repeats), ("--warmup", args.warmup), ("--threads", args.threads),
                        ("--figures-dir", args.figures_dir), ("--pipeline-recipes", args.pipeline_recipes),
                        ("--llama-cpp-src", args.llama_cpp_src), ("--llama-cpp-jobs", args.llama_cpp_jobs),
                        ("--cache-dir", args.cache_dir)):
        if value is not None:
            parts += [flag, ",".join(str(v) for v in value) or "none" if isinstance(value, list) else str(value)]
    if args.decoder:
        parts += ["--decoder", args.decoder]
    if args.no_export:
        parts.append("--no-export")
    if args.ort_no_spin:
        parts.append("--ort-no-spin")
    if args.prepare_only:
        parts.append("--prepare-only")
    if args.reexport:
        parts.append("--reexport")
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


def options_from_args(args: argparse.Namespace):
    from maven_edge.benchmarks.suite import BenchOptions

    given = sum(x is not None for x in (args.artifacts, args.preset, args.checkpoint))
    if args.preset and args.checkpoint:
        raise InputError("give either --preset or --checkpoint, not both")
    if given == 0 and not args.quick:
        raise InputError("give --artifacts DIR, --preset NAME or --checkpoint DIR (or --quick for the tiny preset)")
    anchors = args.anchors
    if anchors is None:
        anchors = ["hf"] if args.quick else list(ANCHOR_NAMES)
    kw = dict(
        out=args.out, artifacts=args.artifacts, int4_artifacts=args.int4_artifacts, preset=args.preset,
        checkpoint=args.checkpoint, overrides=list(args.overrides), seed=args.seed, anchors=anchors,
        precisions=args.precisions, quick=args.quick, export=not args.no_export, figures_dir=args.figures_dir,
        prepare_only=args.prepare_only, reexport=args.reexport, decoder=args.decoder, ort_spinning=not args.ort_no_spin,
        progress=not args.no_progress, command=command_line(args),
    )
    for name in ("backends", "images", "modes", "sections", "new_tokens", "pipeline_new_tokens", "prompt_len", "repeats",
                 "warmup", "threads", "pipeline_recipes", "llama_cpp_src", "llama_cpp_jobs"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.cache_dir:
        kw["cache_dir"] = args.cache_dir
    return BenchOptions(**kw)


def run_bench_command(args: argparse.Namespace) -> int:
    from maven_edge.benchmarks.suite import run_bench

    report = run_bench(options_from_args(args))
    out = Path(args.out)
    if args.json:
        print(json.dumps({"ratios": report.ratios, "files": report.files, "notes": report.notes}, indent=1,
                         default=str))
    else:
        print(f"wrote {out / 'summary.md'}, results.json, CSV files and plots in {out} ({report.seconds:.0f} s)")
        for name, r in report.ratios.items():
            if "decode_ratio" in r:
                mark = "" if "holds" not in r else (" (target met)" if r["holds"] else " (below target)")
                ref = " vs reference figure" if r.get("anchor_figure") == "reference" else ""
                print(f"  {name}: {r['decode_ratio']:.2f}x decode{ref}{mark}")
        for eff in report.efficiency.values():
            c = eff.get("claim_4_images")
            if c:
                print(f"  {eff['preset']}: 4-image hybrid TTFT {c['ttft_speedup']:.2f}x faster than continuous")
        for n in report.notes:
            print(f"  note: {n}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from maven_edge.benchmarks.quantize_report import ReportOptions, render_from_json, run_report

    if args.render_only:
        print(f"wrote {render_from_json(args.render_only)}")
        return 0
    if not args.artifacts or not args.out:
        raise InputError("give --artifacts DIR (fp32 export to evaluate) and --out DIR, or --render-only JSON")
    opts = ReportOptions(
        artifacts=args.artifacts, out=args.out, work=args.work,
        recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()), split=args.split,
        limit=args.limit, edge_artifacts=args.edge_artifacts,
        edge_recipes=tuple(r.strip() for r in args.edge_recipes.split(",") if r.strip()),
        sections=tuple(x.strip() for x in args.sections.split(",") if x.strip()),
        threads=args.threads, reuse=args.reuse, progress=not args.quiet,
        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
    )
    paths = run_report(opts)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from maven_edge.benchmarks.gpu_selftest import (
        SelftestOptions,
        plan_selftest,
        probe_environment,
        render_table,
        run_selftest,
        write_results,
    )
    from maven_edge.core.paths import cache_dir

    if args.questions < 1 or args.new_tokens < 1:
        raise InputError("--questions and --new-tokens must be >= 1")
    env = probe_environment()
    plan = plan_selftest(env, have_artifacts=args.artifacts is not None)
    if plan.skipped:
        print(f"GPU self-test skipped: {plan.skipped}")
        return 2 if args.require_gpu else 0
    print(plan.describe())
    if args.plan_only:
        return 0
    work = Path(args.work) if args.work else cache_dir("selftest")
    plan, results = run_selftest(SelftestOptions(work, args.questions, args.new_tokens, args.artifacts), env)
    gpu = env.gpu or {}
    header = (f"maven-edge GPU self-test: {gpu.get('name', 'no CUDA device via cuda-python')} (sm "
              f"{gpu.get('compute_capability', '-')}), TensorRT {env.tensorrt or '-'}, onnxruntime {env.onnxruntime}; "
              f"{args.questions} test questions, {args.new_tokens} greedy tokens, tiny model")
    table = render_table(results, header)
    print(table)
    write_results(Path(args.json) if args.json else work / "selftest.json", env, plan, results, table)
    return 1 if any(r.status.startswith("error") for r in results) else 0

"""CLI: `maven-edge quantize`, `calib-set` and `build-trt`.

Nothing heavy is imported here: onnxruntime's quantization tools and TensorRT are imported
inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys

from maven_edge.calibration.quantize import CALIB_METHODS, QUANT_METHODS, QUANT_RECIPES
from maven_edge.calibration.tensorrt import DEFAULT_PLAN_TRT
from maven_edge.calibration.tensorrt import PRECISIONS as TRT_PRECISIONS
from maven_edge.calibration.trt_support import ENGINE_RECIPES
from maven_edge.core.cliutil import add_command
from maven_edge.core.manifest import load_manifest


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-images", default=None, metavar="DIR",
                   help="calibration data: a folder of images, a saved set (maven-edge calib-set) or a .npy of "
                   "pixel_values (default: the synthetic validation split)")
    p.add_argument("--calib-samples", type=int, default=32, metavar="N",
                   help="calibration samples (a sample = one request's images; default 32)")
    p.add_argument("--calib-split", default="val", choices=("train", "val", "test"),
                   help="synthetic split to calibrate on (default val)")
    p.add_argument("--allow-upscale", action="store_true",
                   help="accept calibration images smaller than the model input (they are upscaled)")


def register(sub: argparse._SubParsersAction) -> None:
    q = add_command(
        sub, "quantize", help="write reduced-precision artifacts (INT8 static/dynamic, INT4 weight-only, FP16)",
        description="Quantize fp32 artifacts into a new artifact directory whose manifest records each "
        "component's precision and the recipe. See docs/usage/quantization.md.",
        examples=["maven-edge quantize --artifacts artifacts/tiny --out artifacts/tiny-int8 --recipe int8-dynamic",
                  "maven-edge quantize --artifacts artifacts/tiny --out artifacts/tiny-int4 --recipe int4-weight "
                  "--block-size 64",
                  "maven-edge quantize --artifacts artifacts/tiny --out artifacts/tiny-int8s --recipe int8-static "
                  "--calib-method percentile --calib-samples 64"])
    q.add_argument("--artifacts", required=True, metavar="DIR", help="fp32 artifact directory (maven-edge export)")
    q.add_argument("--out", required=True, metavar="DIR", help="new artifact directory")
    q.add_argument("--recipe", required=True, choices=QUANT_RECIPES.names(), metavar="RECIPE",
                   help="required, one of: " + "; ".join(f"{name}: {r.help}" for name, r in QUANT_RECIPES.items()))
    q.add_argument("--calib-method", default="minmax", choices=CALIB_METHODS,
                   help=f"how int8-static measures activation ranges: {', '.join(CALIB_METHODS)} (default minmax)")
    _calib_args(q)
    q.add_argument("--percentile", type=float, default=99.999, help="--calib-method percentile (default 99.999)")
    q.add_argument("--activation-type", default="int8", choices=("int8", "uint8"),
                   help="int8-static activations: int8 (S8S8, default) or uint8 (U8S8)")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel int8 weights")
    q.add_argument("--quantize-discrete-heads", action="store_true",
                   help="also quantize MatMuls that feed ArgMax/TopK (VQ lookup, selector scores); default fp32")
    q.add_argument("--block-size", type=int, default=32,
                   help="int4-weight: weights per quantization block, a power of two >= 16 (default 32)")
    q.add_argument("--accuracy-level", type=int, default=4,
                   help="int4-weight MatMulNBits accuracy level: 0 = fp32 compute, 4 = int8 compute (default)")
    q.add_argument("--asymmetric", action="store_true", help="int4-weight with zero points")
    q.add_argument("--keep-lm-head", action="store_true", help="leave the vocabulary projection in fp32")
    q.add_argument("--component", action="append", default=[], metavar="NAME=METHOD",
                   help=f"override one component's method ({', '.join(QUANT_METHODS)})")
    q.add_argument("--calib-cache", default=None, metavar="DIR", help="reuse calibration ranges across runs")
    q.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress or log lines")
    q.set_defaults(func=_quantize)

    c = add_command(
        sub, "calib-set", help="prepare and save a calibration set for some artifacts",
        description="Preprocess calibration images with the artifacts' preprocessing and save them "
        "(calibration.json + calibration.npz), e.g. to calibrate on another machine.",
        examples=["maven-edge calib-set --artifacts artifacts/tiny --out calib/tiny --calib-samples 16",
                  "maven-edge calib-set --artifacts artifacts/tiny --out calib/mine --calib-images photos/ "
                  "--images-per-sample 2"])
    c.add_argument("--artifacts", required=True, metavar="DIR", help="artifact directory the set is for")
    c.add_argument("--out", required=True, metavar="DIR", help="directory for the saved set")
    c.add_argument("--images-per-sample", type=int, default=1, metavar="N",
                   help="with a folder of images: images per sample (default 1)")
    _calib_args(c)
    c.set_defaults(func=_calib_set)

    t = add_command(
        sub, "build-trt", help="build TensorRT engines (one per component) from artifacts",
        description="Build one serialized TensorRT engine per component with optimisation profiles for the "
        "dynamic axes, an INT8 calibration cache, a timing cache and an engine cache keyed by manifest hash + "
        "GPU + TensorRT version. Needs an NVIDIA GPU and the tensorrt and cuda-python packages (--dry-run "
        "needs neither).",
        examples=["maven-edge build-trt --artifacts artifacts/tiny --out engines/tiny --dry-run",
                  "maven-edge build-trt --artifacts artifacts/tiny --out engines/tiny --dry-run --target-trt 8.6",
                  "maven-edge build-trt --artifacts artifacts/tiny --out engines/tiny --precision fp16"])
    t.add_argument("--artifacts", required=True, metavar="DIR",
                   help="artifact directory (fp32, or int8-static for explicit INT8)")
    t.add_argument("--out", required=True, metavar="DIR", help="engine directory (engines.json + *.engine)")
    t.add_argument("--precision", default="fp16", choices=TRT_PRECISIONS,
                   help="; ".join(f"{n}: {r.range_text()}" for n, r in ENGINE_RECIPES.items())
                   + " (docs/usage/quantization.md; default fp16)")
    t.add_argument("--max-images", type=int, default=None, help="images per request (default: the model's max)")
    t.add_argument("--max-seq", type=int, default=None, help="context length: prompt + new tokens (default 1024)")
    t.add_argument("--max-batch", type=int, default=1, help="sequences per decoder call (default 1)")
    t.add_argument("--workspace", type=float, default=2.0, metavar="GB", help="builder workspace (default 2 GB)")
    t.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    t.add_argument("--timing-cache", default=None, help="timing cache file (default <out>/timing-<gpu>-<trt>.cache)")
    t.add_argument("--engine-cache", default=None, help="engine cache directory (default <out>/cache)")
    t.add_argument("--components", default=None, help="comma-separated subset to build (default: all)")
    t.add_argument("--calib-algorithm", default="entropy", choices=("entropy", "minmax"),
                   help="implicit INT8 calibrator (default entropy)")
    t.add_argument("--calib-source", default="tensorrt", choices=("tensorrt", "onnxruntime"),
                   help="calibrate on the GPU (tensorrt, the default) or measure ranges on the CPU with onnxruntime")
    _calib_args(t)
    t.add_argument("--force", action="store_true", help="rebuild even when the engine cache has the engine")
    t.add_argument("--dry-run", action="store_true",
                   help="print which engines would be built, from which files, with which precision and profiles, "
                   "and which are refused and why, without TensorRT or a GPU; exit status 1 if any is refused")
    t.add_argument("--target-trt", default=None, metavar="VERSION",
                   help="--dry-run: the TensorRT release to plan for (default: the installed one, else "
                   f"{DEFAULT_PLAN_TRT}); a build always uses the installed TensorRT")
    t.add_argument("--quiet", action="store_true", help="no progress or log lines")
    t.set_defaults(func=_build_trt)


def _quantize(args: argparse.Namespace) -> int:
    from maven_edge.calibration.quantize import QuantizeOptions, parse_overrides, quantize_artifacts

    opts = QuantizeOptions(
        recipe=args.recipe, calib_method=args.calib_method, calib_images=args.calib_images,
        calib_samples=args.calib_samples, calib_split=args.calib_split, allow_upscale=args.allow_upscale,
        percentile=args.percentile, per_channel=not args.per_tensor, activation_type=args.activation_type,
        keep_discrete_fp32=not args.quantize_discrete_heads, block_size=args.block_size,
        accuracy_level=args.accuracy_level, symmetric=not args.asymmetric, quantize_lm_head=not args.keep_lm_head,
        components=parse_overrides(args.component), calib_cache=args.calib_cache, force=args.force,
        progress=not args.quiet and not args.json,
    )
    log = None if (args.quiet or args.json) else (lambda m: print(m, file=sys.stderr))
    result = quantize_artifacts(args.artifacts, args.out, opts, log=log)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
        for note in result.notes:
            print(f"note: {note}")
        print(f"wrote {result.out} (recipe {result.manifest.recipe}, loads in onnxruntime >= "
              f"{result.manifest.target_ort}) in {result.seconds:.1f} s")
    return 0


def _calib_set(args: argparse.Namespace) -> int:
    from maven_edge.calibration.readers import resolve_calibration_set

    manifest = load_manifest(args.artifacts, verify=False)
    cs = resolve_calibration_set(args.calib_images, manifest, args.calib_samples, args.calib_split,
                                 args.allow_upscale, args.images_per_sample)
    cs.preset = manifest.preset
    cs.save(args.out)
    print(f"wrote {args.out}: {cs.num_samples} samples, {cs.num_images} images "
          f"({cs.preprocess['image_size']} px, from {cs.source})")
    return 0


def _build_trt(args: argparse.Namespace) -> int:
    from maven_edge.calibration.tensorrt import (
        TrtBuildOptions,
        build_engines,
        plan_engines,
        plan_summary,
        planned_trt_version,
    )

    opts = TrtBuildOptions(
        artifacts=args.artifacts, out=args.out, precision=args.precision, max_images=args.max_images,
        max_seq=args.max_seq, max_batch=args.max_batch, workspace_gb=args.workspace,
        builder_optimization_level=args.opt_level, timing_cache=args.timing_cache, engine_cache=args.engine_cache,
        components=tuple(c.strip() for c in args.components.split(",")) if args.components else None,
        calib_images=args.calib_images, calib_samples=args.calib_samples, calib_split=args.calib_split,
        calib_algorithm=args.calib_algorithm, calib_source=args.calib_source, allow_upscale=args.allow_upscale,
        force=args.force, progress=not args.quiet, target_trt=args.target_trt,
    )
    if args.dry_run:
        version, source = planned_trt_version(opts)
        plans = plan_engines(load_manifest(args.artifacts, verify=False), opts, trt_version=version)
        print(plan_summary(plans, version, source, opts.precision))
        return 1 if any(p.refused for p in plans) else 0
    result = build_engines(opts, log=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(result.table())
    return 0

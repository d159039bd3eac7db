"""`maven-edge export` and `maven-edge validate` (torch is imported only when a command runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maven_edge.core.cliutil import add_command
from maven_edge.core.errors import InputError
from maven_edge.export.genai_decoder import DECODER_CHOICES
from maven_edge.export.ort_compat import DEFAULT_TARGET

OPTIMIZER_CHOICES = ("onnxscript", "onnxslim")


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", type=Path, metavar="DIR",
                     help="checkpoint directory (model.safetensors + config.json)")
    src.add_argument("--preset", help="a preset with seeded random weights: tiny, edge-small, paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set llm.num_layers=2 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="weight seed for --preset (default: the config's seed)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "export", help="export the model to ONNX, one file per component, with manifest.json",
        description="Export vision_encoder, discrete_tokenizer, embed_tokens, patch_selector, projector and "
        "decoder to ONNX (docs/design.md §4), plus tokenizer.json and manifest.json (schema: "
        "docs/manifest.schema.json). Needs PyTorch (the full install).",
        examples=["maven-edge export --checkpoint model_src/checkpoints/tiny --out artifacts/tiny",
                  "maven-edge export --preset tiny --set llm.num_layers=2 --out artifacts/random-tiny",
                  "maven-edge export --checkpoint model_src/checkpoints/tiny --out artifacts/tiny-genai "
                  "--decoder genai --force"])
    _add_model_args(p, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--opset", type=int, default=None, help="ai.onnx opset (>= 17; default 18, capped by --target-ort)")
    p.add_argument("--target-ort", default=DEFAULT_TARGET,
                   help=f"oldest onnxruntime release the files must load in (default {DEFAULT_TARGET}; "
                   "'installed' probes this machine's)")
    p.add_argument("--target-trt", default=None, metavar="VERSION",
                   help="also make the files parse in this TensorRT release (e.g. 8.6 for JetPack 6.0: opset 17); "
                   "see docs/usage/quantization.md")
    p.add_argument("--optimize", nargs="?", const="onnxscript", default=None, choices=OPTIMIZER_CHOICES,
                   help="simplify the graphs with onnxscript (the tool when none is named) or onnxslim; kept only if "
                   "they match the plain export (default: no optimization)")
    p.add_argument("--force", action="store_true", help="overwrite a directory holding another model's export")
    p.add_argument("--external-data-threshold-mb", type=float, default=None,
                   help="weights per file above this go to <file>.onnx.data (default 2000 MB, under protobuf's 2 GiB)")
    p.add_argument("--genai", action="store_true",
                   help="also write genai_config.json + tokenizer_config.json (onnxruntime-genai, text only)")
    p.add_argument("--decoder", default="torch", choices=DECODER_CHOICES,
                   help="how decoder.onnx is made (default torch): torch (torch.onnx export), genai (onnxruntime-genai's "
                   "model builder: fused GroupQueryAttention / SkipSimplifiedLayerNormalization and a shared "
                   "past/present KV buffer; the fastest CPU decode), genai-int4 (the same with int4 MatMulNBits "
                   "weights). genai* need the genai extra, and onnxruntime as recent as the builder's on the device")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)

    v = add_command(
        subparsers, "validate",
        help="compare the ONNX components with torch: per-output diffs and end-to-end greedy tokens",
        description="Run every exported component in onnxruntime (CPU) against the torch reference on real inputs "
        "and compare end-to-end greedy generations. Exit status 1 when a tolerance is exceeded or tokens differ. "
        "The torch reference is the checkpoint or preset the manifest names, unless --checkpoint/--preset is "
        "given. Needs PyTorch.",
        examples=["maven-edge validate --artifacts artifacts/tiny",
                  "maven-edge validate --artifacts artifacts/tiny --checkpoint model_src/checkpoints/tiny "
                  "--questions 8 --json"])
    v.add_argument("--artifacts", type=Path, metavar="DIR", help="artifact directory written by `maven-edge export`")
    v.add_argument("artifacts_positional", nargs="?", type=Path, metavar="ARTIFACTS",
                   help="deprecated: the same as --artifacts ARTIFACTS")
    _add_model_args(v, required=False)
    v.add_argument("--atol", type=float, default=1e-4,
                   help="largest absolute difference allowed for float outputs (default 1e-4)")
    v.add_argument("--questions", type=int, default=4, metavar="N",
                   help="test-split questions answered end to end, greedy, by both (default 4)")
    v.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="most tokens per end-to-end answer (default 16)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=run_validate)


def validate_artifacts_arg(args: argparse.Namespace) -> Path:
    """--artifacts DIR, or the deprecated positional ARTIFACTS (with a note on stderr)."""
    positional = getattr(args, "artifacts_positional", None)
    if positional is not None:
        if args.artifacts is not None and Path(args.artifacts) != Path(positional):
            raise InputError(f"give the artifacts once: --artifacts {args.artifacts} or {positional}, not both")
        print(f"maven-edge validate: note: the positional ARTIFACTS is deprecated; use --artifacts {positional}",
              file=sys.stderr)
        return Path(positional)
    if args.artifacts is None:
        raise InputError("give --artifacts DIR (a directory written by `maven-edge export`)")
    return Path(args.artifacts)


def run_export(args: argparse.Namespace) -> int:
    from maven_edge.export.graph_tools import format_reports
    from maven_edge.export.onnx_export import EXTERNAL_DATA_THRESHOLD, ExportOptions, export_model
    from maven_edge.model_src.checkpoint import load_model

    model = load_model(args.checkpoint, args.preset, args.overrides or None, args.seed)
    if args.checkpoint is not None:
        source = {"kind": "checkpoint", "path": str(Path(args.checkpoint).resolve()), "overrides": args.overrides}
    else:
        source = {"kind": "preset", "preset": args.preset, "overrides": args.overrides,
                  "seed": model.config.seed if args.seed is None else args.seed}
    threshold = (EXTERNAL_DATA_THRESHOLD if args.external_data_threshold_mb is None
                 else int(args.external_data_threshold_mb * 1e6))
    options = ExportOptions(out=args.out, opset=args.opset, target_ort=args.target_ort, optimize=args.optimize,
                            force=args.force, external_data_threshold=threshold, genai=args.genai, decoder=args.decoder,
                            target_trt=args.target_trt,
                            progress=not args.no_progress and not args.json)
    result = export_model(model, options, source=source)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(format_reports(result.reports))
    m = result.manifest
    print(f"wrote {len(m.components)} components + tokenizer.json + manifest.json to {result.out} "
          f"in {result.seconds['total']:.1f} s (opset {m.extra['opset']}, target onnxruntime {m.target_ort}, "
          f"k={m.num_kept_patches})")
    worst = max((d for comp in result.parity.values() for d in comp.values()), default=0.0)
    print(f"export-time check vs torch on example inputs: max abs diff {worst:.2e}; "
          f"run `maven-edge validate --artifacts {result.out}` for the full check")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from maven_edge.export.validate import ValidateOptions, report_json, validate_artifacts

    report = validate_artifacts(ValidateOptions(
        artifacts=validate_artifacts_arg(args), checkpoint=args.checkpoint, preset=args.preset, overrides=args.overrides,
        seed=args.seed, atol=args.atol, questions=args.questions, max_new_tokens=args.max_new_tokens,
    ))
    print(report_json(report) if args.json else report.format_table(), file=sys.stdout)
    return 0 if report.ok else 1

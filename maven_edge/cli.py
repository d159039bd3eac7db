"""`maven-edge` command line: one entry point, one subcommand per job.

Each subcommand lives in the package that owns the work, in a module that exposes
``register(subparsers)``; the module imports nothing heavy at import time (torch is imported
only inside the commands that need it), so `maven-edge generate --artifacts ...` runs on a
device that has only numpy, onnxruntime, tokenizers and Pillow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from maven_edge import __version__
from maven_edge.core.errors import MavenError

# (module, description) in the order data flows through the project.
COMMAND_MODULES = (
    "maven_edge.model_src.hf_commands",  # import-hf
    "maven_edge.model_src.train.commands",  # train, eval, ablations
    "maven_edge.export.commands",  # export, validate, build-trt
    "maven_edge.calibration.commands",  # quantize
    "maven_edge.runtime.commands",  # generate, demo, inspect
    "maven_edge.serving.commands",  # serve, bench-serve
    "maven_edge.benchmarks.commands",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven-edge",
        description="Edge deployment stack for MaVEn-style multimodal LLMs: train, export to ONNX, "
        "quantize, run multi-image question answering and benchmark it.",
    )
    parser.add_argument("--version", action="version", version=f"maven-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part of the project is not there yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except MavenError as exc:
        print(f"maven-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

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
from maven_edge.core.cliutil import HelpFormatter
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


#: Packages of the full install that the torch-free runtime install leaves out: a command that
#: needs one of them says so in one line instead of a traceback.
FULL_INSTALL_MODULES = frozenset({"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors",
                                  "matplotlib", "tqdm", "onnxruntime_genai"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven-edge",
        description="Edge deployment stack for MaVEn-style multimodal LLMs: train, export to ONNX, "
        "quantize, run multi-image question answering and benchmark it. `maven-edge COMMAND --help` shows a "
        "command's options and examples.",
        epilog="examples:\n  maven-edge demo\n  maven-edge export --checkpoint model_src/checkpoints/tiny --out "
        "artifacts/tiny\n  maven-edge generate --artifacts artifacts/tiny --image model_src/samples/demo_1.png "
        "--prompt $'<image>\\nQuestion: what color is the circle?\\nAnswer:'",
        formatter_class=HelpFormatter,
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
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in FULL_INSTALL_MODULES:
            raise
        print(f"maven-edge {args.command}: error: this command needs {missing}, which is not installed here (the "
              "torch-free runtime install runs generate, demo and inspect on exported artifacts); install the full "
              "package: pip install maven-edge (in a checkout: pip install -c constraints.txt -e .)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Record which ONNX operators TensorRT's ONNX parser imports, per TensorRT release (dev tool).

    python tools/trt_op_table.py 8.6=ops-8.6.md 10.0=ops-10.0.md 10.1=ops-10.1.md 10.15=ops-10.15.md

Each argument is ``RELEASE=PATH`` to that release's ``docs/operators.md`` of the onnx-tensorrt
repository (the parser TensorRT ships): its header gives the opset range, its table a Y/N per
operator and the restrictions. The result is ``export/trt_ops.json``, which
:mod:`maven_edge.export.trt_compat` applies to every exported graph before a build. Read
the files from the release branches (``git show 10.1-GA:docs/operators.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "export" / "trt_ops.json"

_ROW = re.compile(r"^\|\s*([A-Za-z0-9]+)\s*\|\s*([YN])\s*\|([^|]*)\|?([^|]*)")
_RANGE = re.compile(r"opset (\d+) to opset (\d+)")
_UP_TO = re.compile(r"up to Opset (\d+)", re.IGNORECASE)


def parse(text: str) -> dict:
    m = _RANGE.search(text)
    if m:
        opsets = [int(m.group(1)), int(m.group(2))]
    else:
        up = _UP_TO.search(text)
        if not up:
            raise SystemExit("no opset range in the header")
        opsets = [7, int(up.group(1))]
    supported: dict[str, list[str]] = {}
    unsupported: list[str] = []
    restrictions: dict[str, str] = {}
    for line in text.splitlines():
        r = _ROW.match(line)
        if not r or r.group(1) == "Operator":
            continue
        op = r.group(1)
        if r.group(2) == "N":
            unsupported.append(op)
            continue
        supported[op] = [t.strip() for t in r.group(3).split(",") if t.strip()]
        note = r.group(4).strip()
        if note:
            restrictions[op] = re.sub(r"\s+", " ", note)
    return {"opsets": opsets, "types": dict(sorted(supported.items())), "unsupported": sorted(unsupported),
            "restrictions": dict(sorted(restrictions.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", metavar="RELEASE=PATH")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--note", action="append", default=[], metavar="RELEASE=TEXT",
                    help="where a release's file came from, when not from its release branch")
    args = ap.parse_args(argv)
    notes = dict(n.split("=", 1) for n in args.note)
    table = {"source": "onnx-tensorrt docs/operators.md of each release branch (tools/trt_op_table.py)",
             "releases": {}}
    for item in args.files:
        release, _, path = item.partition("=")
        table["releases"][release] = parse(Path(path).read_text())
        t = table["releases"][release]
        if release in notes:
            t["note"] = notes[release]
        print(f"{release}: opsets {t['opsets']}, {len(t['types'])} supported", file=sys.stderr)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

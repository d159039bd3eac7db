"""Development tools run from a clone (not part of the installed package): soak, perf and parity checks.

    python -m tools.parity_check --artifacts DIR      # torch vs ONNX Runtime, every test question
    python -m tools.perf_check                         # decode-loop latency / RSS report
    python -m tools.soak --artifacts DIR              # long concurrent load with cancellations
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_report(report: dict[str, Any], out: str | Path | None) -> None:
    """Print a tool's JSON report and, with ``out``, also write it there (folders made)."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)

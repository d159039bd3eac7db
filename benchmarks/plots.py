"""Plots of a benchmark report (matplotlib, Agg backend; imported only when drawing).

- ``<prefix>stages.png``: time-to-first-token broken down by stage, per backend, mode and image count;
- ``<prefix>ttft.png``: TTFT vs number of images, one line per mode (and backend), with the prompt
  tokens each point prefills;
- ``<prefix>decode.png``: decode tokens/s per engine and precision (ours highlighted, reference
  figures hatched and labelled "not measured here"), with the bandwidth roofline per precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maven_edge.runtime.pipeline import STAGES

STAGE_COLORS = {"preprocess": "#9e9e9e", "vision": "#1f77b4", "discrete": "#17becf", "h_eos": "#9467bd",
                "selector": "#e377c2", "assemble": "#bcbd22", "prefill": "#ff7f0e", "decode": "#2ca02c"}
MODE_STYLE = {"hybrid": ("#d62728", "o"), "continuous": ("#1f77b4", "s"), "discrete": ("#2ca02c", "^")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: Any) -> str:
    m = report.machine
    t = m.get("threads_used")
    return f"{report.source.get('preset', '?')} · {m.get('cpu', 'CPU')} · {t} thread{'s' if t != 1 else ''}"


def draw_stages(report: Any, path: Path) -> Path | None:
    from maven_edge.benchmarks.report import stage_rows

    rows = stage_rows(report)
    if not rows:
        return None
    plt = _plt()
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(len(backends), 1, figsize=(10, 1.2 + 0.32 * max(len([r for r in rows if r["backend"] == b])
                                                                               for b in backends) * len(backends) + 1),
                             squeeze=False)
    ttft_stages = [s for s in STAGES if s != "decode"]
    for ax, backend in zip(axes[:, 0], backends, strict=True):
        sub = [r for r in rows if r["backend"] == backend]
        labels = [f"{r['mode']} ×{r['images']} ({r['prompt_tokens']} tok)" for r in sub]
        left = [0.0] * len(sub)
        for s in ttft_stages:
            vals = [r[f"{s}_ms"] or 0.0 for r in sub]
            ax.barh(range(len(sub)), vals, left=left, color=STAGE_COLORS[s], label=s)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        for i, total in enumerate(left):
            ax.text(total, i, f" {total:.0f} ms", va="center", fontsize=7)
        ax.set_yticks(range(len(sub)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time to first token, ms (stacked by stage)")
        ax.set_title(f"{backend} backend", fontsize=9)
        ax.set_xlim(0, max(left) * 1.18 if max(left) > 0 else 1)
    axes[0, 0].legend(fontsize=7, ncol=len(ttft_stages), loc="lower right", bbox_to_anchor=(1.0, 1.08))
    fig.suptitle(f"Per-stage latency to the first token — {_title(report)}", fontsize=9, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_ttft(report: Any, path: Path) -> Path | None:
    from maven_edge.benchmarks.report import stage_rows

    rows = stage_rows(report)
    if not rows:
        return None
    plt = _plt()
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        for mode, (color, marker) in MODE_STYLE.items():
            sub = sorted((r for r in rows if r["backend"] == backend and r["mode"] == mode), key=lambda r: r["images"])
            if not sub:
                continue
            xs, ys = [r["images"] for r in sub], [r["ttft_ms"] for r in sub]
            ax.plot(xs, ys, color=color, marker=marker, label=mode)
            for r in sub:
                ax.annotate(f"{r['prompt_tokens']}", (r["images"], r["ttft_ms"]), fontsize=6, color=color,
                            textcoords="offset points", xytext=(3, 3))
        for (precision, m), style in zip((getattr(report, "mtmd", None) or {}).items(), (":", "-.", "--"),
                                         strict=False):
            cells = sorted((c for c in m.get("cells", []) if c.get("status") == "measured"), key=lambda c: c["images"])
            if cells:
                ax.plot([c["images"] for c in cells], [c["stats"]["ttft_ms"]["median"] for c in cells], color="0.35",
                        linestyle=style, marker=".", label=f"llama.cpp mtmd {precision}")
        ax.set_xlabel("images in the prompt")
        ax.set_ylabel("TTFT, ms (median)")
        ax.set_xticks(sorted({r["images"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.set_title(f"{backend} backend (labels: prompt tokens)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"Time to first token vs images — {_title(report)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_decode(report: Any, path: Path) -> Path | None:
    from maven_edge.benchmarks.report import text_rows

    rows = [r for r in text_rows(report) if r["decode_tok_s"]]
    if not rows:
        return None
    plt = _plt()
    roof = {}
    for r in report.roofline:
        roof.setdefault(r["precision"], r["decode_roofline_tok_s"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    labels = []
    xmax = max(r["decode_tok_s"] for r in rows) * 1.6
    for i, r in enumerate(rows):
        ours = r["engine"] in ("ort", "torch")
        ref = r["status"] == "reference"
        color = "#d62728" if r["engine"] == "ort" else ("#ff9896" if ours else "#7f7f7f")
        ax.barh(i, r["decode_tok_s"], color=color, hatch="//" if ref else None, alpha=0.55 if ref else 1.0,
                edgecolor="black" if ref else color)
        if r.get("decode_min") is not None and r.get("decode_max") is not None:
            ax.plot([r["decode_min"], r["decode_max"]], [i, i], color="black", lw=1)
        ax.text(max(r["decode_tok_s"], r.get("decode_max") or 0), i, f" {r['decode_tok_s']:.1f}" + (" (reference, not measured here)" if ref else ""),
                va="center", fontsize=7)
        if r["precision"] in roof and roof[r["precision"]] <= xmax:
            ax.plot([roof[r["precision"]]] * 2, [i - 0.4, i + 0.4], color="black", ls=":", lw=1.2)
        elif r["precision"] in roof:
            ax.text(xmax, i, f"roofline {roof[r['precision']]:.0f} →", ha="right", va="center", fontsize=6)
        labels.append(f"{r['label']} · {r['precision']}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel("decode tokens/s (median; whiskers min–max; dotted: bandwidth roofline for that precision)")
    o = report.options
    ax.set_title(f"Text decode, {o['prompt_len']}-token prompt, {o['new_tokens']} new tokens — {_title(report)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(report: Any, out: Path, prefix: str = "bench_") -> dict[str, Path]:
    """Draw every plot the report has data for; returns name -> path."""
    out = Path(out)
    preset = str(report.source.get("preset", "model")).replace("/", "-")
    made = {}
    for name, fn in (("stages", draw_stages), ("ttft", draw_ttft), ("decode", draw_decode)):
        p = fn(report, out / f"{prefix}{preset}_{name}.png")
        if p is not None:
            made[name] = p
    return made

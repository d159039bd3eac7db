"""Turn collected measurements into ratios, roofline fractions, efficiency tables and files.

Files written into the output directory:

- ``results.json``: everything (options, machine, source model, limits, every sample);
- ``text.csv``: one row per engine x precision (decode tok/s, prefill, memory, model size);
- ``stages.csv``: one row per backend x mode x image count (per-stage medians, TTFT, tokens);
- ``efficiency.csv``: hybrid vs continuous vs discrete per image count;
- ``summary.md``: the Markdown tables ``docs/benchmarks.md`` shows;
- ``bench_*.png``: the plots (:mod:`maven_edge.benchmarks.plots`).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from maven_edge.benchmarks.caches import render as render_caches
from maven_edge.benchmarks.harness import describe_machine
from maven_edge.benchmarks.roofline import DecoderCost, MachineLimits, roofline_row
from maven_edge.core.config import MavenConfig
from maven_edge.runtime.pipeline import STAGES

#: Engine precision -> the roofline's bytes-per-parameter key.
_ROOF_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-dynamic": "int8-dynamic", "int4": "int4",
                   "q8_0": "q8_0", "q4_0": "q4_0"}
#: Ratios the issue asks for: name -> (our engine, our precision, anchor, anchor precision).
RATIO_PAIRS = {
    "ort_fp32_vs_genai_fp32": ("ort", "fp32", "genai", "fp32"),
    "ort_fp32_vs_optimum_fp32": ("ort", "fp32", "optimum", "fp32"),
    "ort_fp32_vs_hf_fp32": ("ort", "fp32", "hf", "fp32"),
    "ort_fp32_vs_llamacpp_fp32": ("ort", "fp32", "llamacpp", "fp32"),
    "ort_fp32_vs_torch_fp32": ("ort", "fp32", "torch", "fp32"),
    "ort_int4_vs_genai_int4": ("ort", "int4", "genai", "int4"),
    "ort_int4_vs_llamacpp_q4_0": ("ort", "int4", "llamacpp", "q4_0"),
    "ort_int8_vs_llamacpp_q8_0": ("ort", "int8", "llamacpp", "q8_0"),
    "ort_int8_dynamic_vs_llamacpp_q8_0": ("ort", "int8-dynamic", "llamacpp", "q8_0"),
    "ort_fp32_vs_ort_fp32_dynamo": ("ort", "fp32", "ort", "fp32-dynamo"),  # builder decoder vs torch.onnx decoder
}
#: The issue's "what must hold" thresholds on decode ratios.
TARGETS = {"ort_fp32_vs_genai_fp32": 0.9, "ort_fp32_vs_hf_fp32": 2.0, "ort_int4_vs_genai_int4": 0.9,
           "ort_int8_vs_llamacpp_q8_0": 1.2, "ort_int8_dynamic_vs_llamacpp_q8_0": 1.2, "ort_int4_vs_llamacpp_q4_0": 1.0,
           "ort_fp32_vs_llamacpp_fp32": 1.0}
#: First-answer latency targets (issue 35): (name, images, our mode, what it is compared with, threshold).
#: "llamacpp:fp32" = llama.cpp mtmd at f32; "continuous" = our continuous mode on the same artifacts.
TTFT_TARGETS = (("hybrid_4_images_vs_llamacpp_mtmd_f32", 4, "llamacpp:fp32", 3.0),
                ("hybrid_4_images_vs_own_continuous", 4, "continuous", 2.3),
                ("hybrid_1_image_vs_llamacpp_mtmd_f32", 1, "llamacpp:fp32", 2.0))


def _median(row: dict[str, Any], key: str) -> float | None:
    s = (row.get("stats") or {}).get(key)
    return s["median"] if s else None


def _find(text: list[dict[str, Any]], engine: str, precision: str) -> dict[str, Any] | None:
    return next((r for r in text if r.get("engine") == engine and r.get("precision") == precision), None)


def _decode(row: dict[str, Any] | None) -> tuple[float | None, str]:
    """(decode tok/s, 'measured' | 'reference') of a text row."""
    if row is None:
        return None, ""
    if row.get("status") == "measured":
        return _median(row, "decode_tok_s"), "measured"
    ref = row.get("reference") or {}
    if ref.get("decode_tok_s"):
        return ref["decode_tok_s"], "reference"
    return None, ""


def _prefill(row: dict[str, Any] | None) -> tuple[float | None, str]:
    if row is None:
        return None, ""
    if row.get("status") == "measured":
        return _median(row, "prefill_ms"), "measured"
    ref = row.get("reference") or {}
    if ref.get("prefill_ms_256"):
        return ref["prefill_ms_256"], "reference"
    return None, ""


def token_agreement(text: list[dict[str, Any]]) -> None:
    """Mark each measured row with how many leading greedy tokens match the fp32 reference engine."""
    ref = None
    for engine in ("torch", "hf", "ort"):
        r = _find(text, engine, "fp32")
        if r and r.get("status") == "measured" and r.get("tokens"):
            ref = r
            break
    if ref is None:
        return
    for row in text:
        toks = row.get("tokens")
        if row.get("status") != "measured" or not toks:
            continue
        n = 0
        for a, b in zip(toks, ref["tokens"], strict=False):
            if a != b:
                break
            n += 1
        row["agree_with"] = f"{ref['engine']} {ref['precision']}"
        row["agree_tokens"] = n
        row["compared_tokens"] = min(len(toks), len(ref["tokens"]))


def analyse(report: Any, o: Any) -> None:
    """Fill report.ratios, report.roofline and report.efficiency from the raw measurements."""
    text = report.text
    token_agreement(text)
    ratios: dict[str, Any] = {}
    for name, (e1, p1, e2, p2) in RATIO_PAIRS.items():
        ours, ours_kind = _decode(_find(text, e1, p1))
        other, kind = _decode(_find(text, e2, p2))
        if ours_kind != "measured" or not other:
            continue
        pre_ours, _ = _prefill(_find(text, e1, p1))
        pre_other, _ = _prefill(_find(text, e2, p2))
        entry: dict[str, Any] = {"decode_ratio": ours / other, "ours_tok_s": ours, "anchor_tok_s": other,
                                 "anchor_figure": kind}
        if pre_ours and pre_other:
            entry["prefill_speedup"] = pre_other / pre_ours  # > 1: our prefill is faster
        if name in TARGETS:
            entry["target"] = TARGETS[name]
            entry["holds"] = entry["decode_ratio"] >= TARGETS[name]
        ratios[name] = entry
    # Prefill per token: a 4-image hybrid prompt on our ORT pipeline vs onnxruntime-genai's text prefill.
    ort = report.pipeline.get("ort") or {}
    cell = next((c for c in ort.get("cells", []) if c.get("mode") == "hybrid" and c.get("images") == 4
                 and c.get("status") == "measured"), None)
    genai = _find(text, "genai", "fp32")
    if cell and genai and genai.get("status") == "measured":
        ours_pt = cell["stats"]["prefill_ms"]["median"] / cell["prompt_tokens"]
        theirs_pt = _median(genai, "prefill_ms") / o.prompt_len
        ratios["prefill_per_token_hybrid4_vs_genai"] = {
            "ours_ms_per_token": ours_pt, "ours_prompt_tokens": cell["prompt_tokens"],
            "genai_ms_per_token": theirs_pt, "genai_prompt_tokens": o.prompt_len,
            "ratio": theirs_pt / ours_pt, "target": 1.0, "holds": ours_pt <= theirs_pt,
        }
    ttft = ttft_targets(report)
    if ttft:
        ratios["first_answer"] = ttft
    report.ratios = ratios

    cfg_dict = report.source.get("config")
    if cfg_dict and report.limits:
        cfg = MavenConfig.from_dict(cfg_dict)
        cost = DecoderCost.from_llm(cfg.llm, cfg.vocab_size)
        limits = MachineLimits(**{k: v for k, v in report.limits.items() if k != "bandwidth_gbs"})
        rows = []
        for row in text:
            decode, kind = _decode(row)
            prefill, _ = _prefill(row)
            if not decode or row.get("precision") not in _ROOF_PRECISION:
                continue
            r = roofline_row(cost, _ROOF_PRECISION[row["precision"]], o.prompt_len if kind == "measured" else 256,
                             o.new_tokens if kind == "measured" else 64, decode, prefill, limits)
            r.update({"engine": row["engine"], "figure": kind})
            rows.append(r)
        report.roofline = rows
        report.source["decoder_cost"] = {"matmul_params": cost.matmul_params, "total_params": cost.total_params,
                                         "kv_bytes_per_position_fp32": cost.kv_bytes_per_position()}

    if cfg_dict:
        from maven_edge.benchmarks.efficiency import summarize

        cfg = MavenConfig.from_dict(cfg_dict)
        report.efficiency = {b: summarize(p, cfg, b) for b, p in report.pipeline.items()
                             if p.get("status") == "measured"}


def _cell_median(cells: list[dict[str, Any]], mode: str | None, images: int, key: str = "ttft_ms") -> float | None:
    c = next((c for c in cells if c.get("status") == "measured" and c.get("images") == images
              and (mode is None or c.get("mode") == mode)), None)
    return _median(c, key) if c else None


def ttft_rows(report: Any) -> list[dict[str, Any]]:
    """Time to first token per image count: every ort pipeline run (hybrid and continuous) and
    llama.cpp's multimodal runtime at each precision, side by side (``ttft.csv``)."""
    images = sorted({c["images"] for p in report.pipeline.values() for c in p.get("cells", [])
                     if c.get("status") == "measured"} |
                    {c["images"] for m in (report.mtmd or {}).values() for c in m.get("cells", [])})
    rows = []
    for n in images:
        row: dict[str, Any] = {"images": n}
        for key, p in report.pipeline.items():
            for mode in ("hybrid", "hybrid-context", "continuous"):
                v = _cell_median(p.get("cells", []), mode, n)
                if v is not None:
                    row[f"{key} {mode}"] = v
        for precision, m in (report.mtmd or {}).items():
            v = _cell_median(m.get("cells", []), None, n)
            if v is not None:
                row[f"llama.cpp mtmd {precision}"] = v
        rows.append(row)
    return rows


def ttft_targets(report: Any) -> list[dict[str, Any]]:
    """The first-answer targets for every ort pipeline run that measured hybrid mode."""
    out = []
    mtmd = report.mtmd or {}
    for key, p in report.pipeline.items():
        if not key.startswith("ort") or p.get("status") != "measured":
            continue
        cells = p.get("cells", [])
        for ours_mode in ("hybrid", "hybrid-context"):  # h_eos in a separate pass / in context
            for name, n, other, threshold in TTFT_TARGETS:
                ours = _cell_median(cells, ours_mode, n)
                if other.startswith("llamacpp:"):
                    m = mtmd.get(other.split(":", 1)[1]) or {}
                    theirs = _cell_median(m.get("cells", []), None, n) if m.get("status") == "measured" else None
                else:
                    theirs = _cell_median(cells, other, n)
                if ours and theirs:
                    label = key if ours_mode == "hybrid" else f"{key} {ours_mode}"
                    out.append({"pipeline": label, "target": name, "images": n, "ours_ttft_ms": ours,
                                "other_ttft_ms": theirs, "speedup": theirs / ours, "threshold": threshold,
                                "holds": theirs / ours >= threshold})
    return out


# ---- files ---------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def text_rows(report: Any) -> list[dict[str, Any]]:
    rows = []
    for r in report.text:
        d, kind = _decode(r)
        p, _ = _prefill(r)
        st = (r.get("stats") or {}).get("decode_tok_s") or {}
        rows.append({
            "engine": r.get("engine"), "label": r.get("label", r.get("engine")), "precision": r.get("precision"),
            "status": r.get("status") if r.get("status") != "unavailable" or not r.get("reference") else "reference",
            "decode_tok_s": d, "decode_min": st.get("min"), "decode_max": st.get("max"), "prefill_ms": p,
            "peak_rss_mb": r.get("peak_rss_mb"), "model_mb": ((r.get("prepared") or {}).get("bytes") or 0) / 1e6 or None,
            "agree_tokens": r.get("agree_tokens"), "compared_tokens": r.get("compared_tokens"),
            "figure": kind, "reason": r.get("reason", ""),
        })
    return rows


def stage_rows(report: Any) -> list[dict[str, Any]]:
    rows = []
    for backend, p in report.pipeline.items():
        for c in p.get("cells", []):
            if c.get("status") != "measured":
                continue
            row = {"backend": backend, "mode": c["mode"], "images": c["images"], "prompt_tokens": c["prompt_tokens"],
                   "visual_tokens_per_image": c["visual_tokens_per_image"], "new_tokens": c["new_tokens"]}
            for key in [f"{s}_ms" for s in STAGES] + ["ttft_ms", "total_ms", "decode_step_ms"]:
                s = c["stats"].get(key)
                row[key] = s["median"] if s else None
            row["ttft_spread"] = c["stats"]["ttft_ms"]["spread"]
            row["peak_rss_mb"] = p.get("peak_rss_mb")
            rows.append(row)
    return rows


def efficiency_rows(report: Any) -> list[dict[str, Any]]:
    rows = []
    for backend, eff in report.efficiency.items():
        for r in eff["rows"]:
            for mode in ("hybrid", "continuous", "discrete"):
                m = r.get(mode)
                if not m:
                    continue
                rows.append({"preset": eff["preset"], "backend": backend, "images": r["images"], "mode": mode,
                             "visual_tokens_per_image": m["visual_tokens_per_image"],
                             "prompt_tokens": m["prompt_tokens"], "ttft_ms": m["ttft_ms"], "prefill_ms": m["prefill_ms"],
                             "visual_ms": m["visual_ms"],
                             "ttft_speedup_vs_continuous": (r["continuous"]["ttft_ms"] / m["ttft_ms"])
                             if r.get("continuous") and m["ttft_ms"] else None})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def markdown(report: Any) -> str:
    o = report.options
    lines = [f"# Benchmark results: {report.source.get('preset', '?')}", ""]
    if o.get("command"):
        lines += ["Command:", "", "```", o["command"], "```", ""]
    lines += [f"Machine: {describe_machine(report.machine)}.", ""]
    libs = {k: v for k, v in report.machine.get("libraries", {}).items() if v}
    lines += ["Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".", ""]
    if not report.machine.get("gpus"):
        lines += ["No GPU on this machine: every number is CPU; GPU numbers are **not measured here**.", ""]
    src = report.source
    if src.get("llm_params"):
        lines += [f"Model: `{src.get('preset')}` ({src.get('hf_class', '')} decoder, {src['llm_params'] / 1e6:.0f}M "
                  f"decoder params, vocab {src.get('vocab_size')}, {src.get('model_params', 0) / 1e6:.0f}M params in "
                  f"all), fingerprint `{str(src.get('fingerprint', ''))[:16]}`.", ""]
    # limits
    if report.limits:
        lim = report.limits
        lines += ["## Machine limits (measured in this run)", "",
                  "| copy bandwidth | GEMV bandwidth | roofline bandwidth used | fp32 matmul |", "|---|---|---|---|",
                  f"| {lim['copy_gbs']:.1f} GB/s | {lim['gemv_gbs']:.1f} GB/s | {lim['bandwidth_gbs']:.1f} GB/s | "
                  f"{lim['matmul_gflops']:.0f} GFLOP/s |", ""]
    lc = report.llama_cpp or {}
    if lc:
        if lc.get("error"):
            lines += [f"llama.cpp: **not measured in this run**: {lc['error'][:300]}", ""]
        else:
            how = "reused from the cache" if lc.get("cached") else "built in this run"
            lines += [f"llama.cpp: {lc.get('version', '?')} from {lc.get('source', '?')}, {how} "
                      f"(build took {lc.get('build_seconds', 0):.0f} s); flags `{' '.join(lc.get('flags', []))}`.", ""]
    # text
    trows = text_rows(report)
    ref_name = next((r.get("agree_with") for r in report.text if r.get("agree_with")), "reference")
    if trows:
        lines += [f"## Text generation ({o['prompt_len']}-token prompt, {o['new_tokens']} new tokens, greedy, "
                  f"{o['threads']} thread{'s' if o['threads'] != 1 else ''}, median of {o['repeats']})", "",
                  "| engine | precision | decode tok/s (min–max) | prefill ms | peak RSS MB | model MB | "
                  f"greedy tokens = {ref_name} |", "|---|---|---|---|---|---|---|"]
        for r in trows:
            if r["status"] == "measured":
                rng = f" ({_fmt(r['decode_min'])}–{_fmt(r['decode_max'])})" if r["decode_min"] is not None else ""
                agree = (f"{r['agree_tokens']}/{r['compared_tokens']}" if r["agree_tokens"] is not None else "–")
                lines.append(f"| {r['label']} | {r['precision']} | {_fmt(r['decode_tok_s'])}{rng} | "
                             f"{_fmt(r['prefill_ms'], 0)} | {_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['model_mb'], 0)} | "
                             f"{agree} |")
            elif r["status"] == "reference":
                lines.append(f"| {r['label']} | {r['precision']} | {_fmt(r['decode_tok_s'])} *(reference, not measured "
                             f"here)* | {_fmt(r['prefill_ms'], 0)} *(ref.)* | – | – | – |")
            else:
                lines.append(f"| {r['label']} | {r['precision']} | {r['status']}: {r['reason'][:90]} | | | | |")
        lines.append("")
    if report.ratios:
        lines += ["## Our ORT decode speed as ratios", "", "| ratio | ours tok/s | anchor tok/s | decode ratio | "
                  "prefill speed-up | target |", "|---|---|---|---|---|---|"]
        for name, r in report.ratios.items():
            if "decode_ratio" not in r:
                continue
            tgt = (f"≥ {r['target']}: {'holds' if r['holds'] else '**does not hold**'}" if "target" in r else "")
            ref = " (issue's reference figure, not this run)" if r["anchor_figure"] == "reference" else ""
            lines.append(f"| {name} | {r['ours_tok_s']:.1f} | {r['anchor_tok_s']:.1f}{ref} | {r['decode_ratio']:.2f}× | "
                         f"{_fmt(r.get('prefill_speedup'), 2)}{'×' if r.get('prefill_speedup') else ''} | {tgt} |")
        pp = report.ratios.get("prefill_per_token_hybrid4_vs_genai")
        if pp:
            lines += ["", f"Prefill per token: our ORT pipeline, 4-image hybrid prompt ({pp['ours_prompt_tokens']} "
                      f"tokens): {pp['ours_ms_per_token']:.2f} ms/token; onnxruntime-genai fp32 text prefill "
                      f"({pp['genai_prompt_tokens']} tokens): {pp['genai_ms_per_token']:.2f} ms/token → "
                      f"{'holds' if pp['holds'] else '**does not hold**'} (ours no slower per token)."]
        lines.append("")
    if report.roofline:
        lines += ["## Against the machine's limits", "",
                  "| engine | precision | bytes/token MB | decode roofline tok/s | decode tok/s | fraction | effective GB/s | "
                  "share of copy bandwidth | prefill GFLOP/s | fraction of matmul |", "|---|---|---|---|---|---|---|---|---|---|"]
        copy = (report.limits or {}).get("copy_gbs")
        for r in report.roofline:
            ref = " *(ref.)*" if r["figure"] == "reference" else ""
            share = (f"{100 * r['decode_effective_gbs'] / copy:.0f} %" if copy and r.get("decode_effective_gbs")
                     else "–")
            lines.append(f"| {r['engine']}{ref} | {r['precision']} | {r['decode_bytes_per_token_mb']:.0f} | "
                         f"{r['decode_roofline_tok_s']:.1f} | {_fmt(r['decode_tok_s'])} | "
                         f"{_fmt(r['decode_fraction_of_roofline'], 2)} | {_fmt(r['decode_effective_gbs'])} | {share} | "
                         f"{_fmt(r['prefill_achieved_gflops'], 0)} | {_fmt(r['prefill_fraction_of_matmul'], 2)} |")
        lines.append("")
    srows = stage_rows(report)
    if srows:
        lines += [f"## Multimodal pipeline: per-stage latency (median ms of {o['repeats']}, up to "
                  f"{o.get('pipeline_new_tokens') or o['new_tokens']} new tokens, {o['threads']} "
                  f"thread{'s' if o['threads'] != 1 else ''})", "",
                  "| backend | mode | images | prompt tokens | " + " | ".join(STAGES[:-1]) +
                  " | TTFT | decode ms/token | end-to-end |",
                  "|" + "---|" * (len(STAGES) + 6)]
        for r in srows:
            lines.append(f"| {r['backend']} | {r['mode']} | {r['images']} | {r['prompt_tokens']} | "
                         + " | ".join(_fmt(r[f'{s}_ms']) for s in STAGES[:-1])
                         + f" | {_fmt(r['ttft_ms'])} | {_fmt(r['decode_step_ms'])} | {_fmt(r['total_ms'])} |")
        mem = {b: p.get("peak_rss_mb") for b, p in report.pipeline.items() if p.get("peak_rss_mb")}
        if mem:
            lines += ["", "Peak resident memory of the pipeline process: "
                      + ", ".join(f"{b} {v:.0f} MB" for b, v in mem.items()) + "."]
        lines.append("")
    for backend, eff in report.efficiency.items():
        g = eff["geometry"]
        lines += [f"## Efficiency: hybrid vs continuous vs discrete ({eff['preset']}, {backend} backend)", "",
                  f"{g['patches']} patches per image; hybrid keeps {g['codes']} codes + {g['kept']} patches "
                  f"(keep ratio {g['keep_ratio']}); LLM {g['llm_layers']} layers × {g['llm_hidden']}, "
                  f"ViT {g['vision_layers']} layers × {g['vision_hidden']}.", "",
                  "| images | prompt tokens H / C / D | TTFT ms hybrid | TTFT ms continuous | TTFT ms discrete | "
                  "visual-token reduction | prefill FLOP ratio | TTFT speed-up H vs C | prefill speed-up H vs C |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in eff["rows"]:
            h, c, d = r.get("hybrid") or {}, r.get("continuous") or {}, r.get("discrete") or {}
            lines.append(
                f"| {r['images']} | {h.get('prompt_tokens', '–')} / {c.get('prompt_tokens', '–')} / "
                f"{d.get('prompt_tokens', '–')} | {_fmt(h.get('ttft_ms'))} | {_fmt(c.get('ttft_ms'))} | "
                f"{_fmt(d.get('ttft_ms'))} | {_fmt(r.get('visual_token_reduction'), 2)}× | "
                f"{_fmt(r.get('prefill_flop_ratio'), 2)}× | {_fmt(r.get('ttft_speedup_hybrid_vs_continuous'), 2)}× | "
                f"{_fmt(r.get('prefill_speedup_hybrid_vs_continuous'), 2)}× |")
        claim = eff.get("claim_4_images")
        if claim:
            lines += ["", f"4 images: hybrid TTFT is {claim['ttft_speedup']:.2f}× faster than continuous "
                      f"({'≥ 2×: holds' if claim['holds_2x'] else '< 2×: **does not hold**'}); visual tokens "
                      f"{claim['visual_token_reduction']:.2f}× fewer, prefill FLOPs {claim['prefill_flop_ratio']:.2f}× "
                      "fewer."]
        lines.append("")
    lines += _ttft_markdown(report)
    lines += render_caches(report.caches)
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += [f"Run time: {report.seconds:.0f} s. Raw samples: `results.json`.", ""]
    return "\n".join(lines)


def _ttft_markdown(report: Any) -> list[str]:
    rows = ttft_rows(report)
    mtmd = report.mtmd or {}
    if not rows or not mtmd:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "images"))
    lines = ["## First answer: time to first token vs llama.cpp's multimodal runtime (median ms)", "",
             "llama.cpp: `llama-mtmd-cli` on a LLaVA-style model of the same geometry (our decoder as GGUF at each "
             "precision + our ViT and projector as an f32 mmproj, every patch as a token); its TTFT is libmtmd's "
             "image encode plus the prompt evaluation from its own `--perf` counters (image decoding from PNG "
             "excluded). Ours: the pipeline's TTFT (preprocessing included) per artifact set.", "",
             "| images | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['images']} | " + " | ".join(_fmt(r.get(c), 0) for c in cols) + " |")
    for precision, m in mtmd.items():
        if m.get("status") != "measured":
            lines += ["", f"llama.cpp mtmd {precision}: {m.get('status')}: {str(m.get('reason', ''))[:200]}"]
    stage = []
    for precision, m in mtmd.items():
        for c in m.get("cells", []):
            stage.append(f"| {precision} | {c['images']} | {c.get('prompt_tokens', '–')} | "
                         f"{_fmt(_median(c, 'vision_ms'), 0)} | {_fmt(_median(c, 'prefill_ms'), 0)} | "
                         f"{_fmt(_median(c, 'ttft_ms'), 0)} | {_fmt(_median(c, 'decode_tok_s'))} |")
    if stage:
        lines += ["", "llama.cpp mtmd per stage:", "",
                  "| precision | images | prompt tokens | image encode ms | prompt eval ms | TTFT ms | decode tok/s |",
                  "|---|---|---|---|---|---|---|", *stage]
    targets = (report.ratios or {}).get("first_answer") or []
    if targets:
        lines += ["", "| our pipeline | target | ours ms | compared ms | speed-up | threshold | |",
                  "|---|---|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['pipeline']} | {t['target']} | {t['ours_ttft_ms']:.0f} | {t['other_ttft_ms']:.0f} | "
                         f"{t['speedup']:.2f}× | ≥ {t['threshold']}× | {'holds' if t['holds'] else '**missed**'} |")
    return lines + [""]


def write_outputs(report: Any, out: Path, figures_dir: str | None = None, prefix: str = "bench_") -> None:
    out = Path(out)
    files = {"json": str(out / "results.json"), "text_csv": str(out / "text.csv"),
             "stages_csv": str(out / "stages.csv"), "efficiency_csv": str(out / "efficiency.csv"),
             "summary": str(out / "summary.md"), "ttft_csv": str(out / "ttft.csv")}
    _write_csv(out / "ttft.csv", ttft_rows(report))
    _write_csv(out / "text.csv", text_rows(report))
    _write_csv(out / "stages.csv", stage_rows(report))
    _write_csv(out / "efficiency.csv", efficiency_rows(report))
    try:
        from maven_edge.benchmarks.plots import draw_all

        for name, path in draw_all(report, out, prefix=prefix).items():
            files[f"plot_{name}"] = str(path)
            if figures_dir:
                Path(figures_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(figures_dir) / Path(path).name)
    except ImportError as exc:  # matplotlib missing: the numbers still count
        report.notes.append(f"plots skipped: {exc}")
    report.files = files
    (out / "summary.md").write_text(markdown(report))
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))

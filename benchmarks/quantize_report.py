"""The accuracy / size / latency report of the quantization recipes (`maven-edge quantize-report`).

    maven-edge export --checkpoint model_src/checkpoints/tiny --out artifacts/tiny
    maven-edge export --preset edge-small --out artifacts/edge-small
    maven-edge quantize-report --artifacts artifacts/tiny --edge-artifacts artifacts/edge-small --out docs

For every recipe the fp32 artifacts are quantized into ``--work/<recipe>`` and the test split is
answered by the runtime pipeline (onnxruntime, CPU, greedy) with the fp32 and every quantized
artifact set side by side, sample by sample, so load changes on a shared machine hit every
recipe alike. Reported per recipe: file sizes, exact-match accuracy per task family and its
change vs fp32 in points, greedy-token agreement with fp32, and CPU latency (median request,
vision side and decode step) relative to fp32. The edge-small section quantizes the edge-small
decoder and reports its file size and the decode-step latency at a fixed KV length.

Writes ``quantization.md`` and ``quantization.json`` into ``--out``. torch-free.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.calibration.quantize import QUANT_RECIPES, QuantizeOptions, made_by, quantize_artifacts
from maven_edge.core.errors import ArtifactError, InputError
from maven_edge.core.manifest import MANIFEST, load_manifest, sha256_file
from maven_edge.core.paths import cache_dir, shown_path
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS

#: The issue's targets.
TARGETS = {"int8_static_max_drop": 2.0, "int4_max_drop": 5.0, "int4_decoder_max_ratio": 0.30}


@dataclass
class ReportOptions:
    artifacts: str | Path
    out: str | Path = "docs"
    work: str | Path | None = None  # None: quant-report/ in the user cache directory
    recipes: tuple[str, ...] = QUANT_RECIPES.names()
    split: str = "test"
    limit: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # as `maven-edge eval`: an 8-image labelled tally is 54 tokens
    calib_samples: int = 32
    edge_artifacts: str | Path | None = None
    edge_recipes: tuple[str, ...] = ("int4-weight", "int8-dynamic")
    edge_past: int = 128
    edge_steps: int = 24
    edge_rounds: int = 3
    calib_test_samples: int = 48  # test-split samples for the calibration-method comparison
    sections: tuple[str, ...] = ("accuracy", "calib", "edge")
    threads: int = 2
    reuse: bool = False
    progress: bool = True

    def validate(self) -> ReportOptions:
        bad = [r for r in (*self.recipes, *self.edge_recipes) if r not in QUANT_RECIPES]
        if bad:
            raise InputError(f"unknown recipe(s) {bad}; choose from {', '.join(QUANT_RECIPES)}")
        unknown = [x for x in self.sections if x not in SECTIONS]
        if unknown or not self.sections:
            raise InputError(f"--sections must name some of {', '.join(SECTIONS)}, got {list(self.sections)}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        return self


# ---- quantized artifact sets -------------------------------------------------------------------------


def ensure_quantized(src: Path, work: Path, recipe: str, reuse: bool, calib_samples: int,
                     progress: bool) -> tuple[Path, float]:
    """`work/recipe` quantized from `src` (reused when it was made from the same fp32 manifest by the
    recipe as it is now, with the same options: ``made_by``)."""
    out = work / recipe
    opts = QuantizeOptions(recipe=recipe, calib_samples=calib_samples, force=True, progress=progress)
    if reuse and made_by(out, recipe, sha256_file(src / MANIFEST), opts):
        return out, 0.0
    t0 = time.perf_counter()
    quantize_artifacts(src, out, opts)
    return out, time.perf_counter() - t0


def sizes(directory: Path) -> dict[str, int]:
    m = load_manifest(directory, verify=False)
    return {name: c.file.size_bytes + sum(e.size_bytes for e in c.external_data) for name, c in m.components.items()}


# ---- evaluation through the pipeline ----------------------------------------------------------------------


def _pipeline(directory: Path, threads: int) -> Any:
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline.from_artifacts(directory, providers=["cpu"],
                                        session_options=SessionConfig(intra_op_num_threads=threads))


def agreement(ref: list[int], got: list[int], ref_end: str, got_end: str) -> tuple[int, int]:
    """(positions of `ref` reproduced before the first divergence, positions compared).

    Each sequence ends with a marker for how it stopped (eos / length), so a quantized run that
    keeps talking past the fp32 answer's end diverges there."""
    a, b = [*ref, f"<{ref_end}>"], [*got, f"<{got_end}>"]
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n, len(a)


def evaluate_sets(sets: dict[str, Path], split: str, limit: int | None, max_new_tokens: int, threads: int,
                  progress: bool) -> dict[str, Any]:
    """Answer the split with every artifact set, sample by sample. Returns raw per-set records."""
    from tqdm import tqdm

    from maven_edge.model_src.data import iter_samples, num_samples
    from maven_edge.model_src.data.tasks import normalize_answer

    first = load_manifest(next(iter(sets.values())), verify=False).maven_config()
    n = num_samples(split) if limit is None else min(limit, num_samples(split))
    pipes = {name: _pipeline(path, threads) for name, path in sets.items()}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    samples = iter_samples(split, n, image_size=first.vision.image_size, patch_size=first.vision.patch_size)
    order = list(pipes)
    for i, s in enumerate(tqdm(samples, total=n, desc=f"eval {split} x{len(sets)}", disable=not progress,
                               mininterval=5.0)):
        # Rotate which set goes first: the first call after a pause measures slower decode steps.
        for name in order[i % len(order):] + order[: i % len(order)]:
            pipe = pipes[name]
            res = pipe.generate(s.images, s.prompt, max_new_tokens=max_new_tokens, greedy=True)
            t = res.timings
            records[name].append({
                "family": s.family, "task": s.task, "correct": normalize_answer(res.text) == normalize_answer(s.answer),
                "tokens": list(res.token_ids), "finish": res.finish_reason, "total_ms": t.total_ms,
                "visual_ms": t.vision_ms + t.discrete_ms + t.h_eos_ms + t.selector_ms,
                "prefill_ms": t.prefill_ms, "decode_step_ms": list(t.decode_step_ms),
            })
    for p in pipes.values():
        p.close()
    return records


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(records: dict[str, list[dict[str, Any]]], reference: str = "fp32") -> dict[str, Any]:
    ref = records[reference]
    out: dict[str, Any] = {}
    for name, recs in records.items():
        fams: dict[str, list[bool]] = {}
        for r in recs:
            fams.setdefault(r["family"], []).append(r["correct"])
        same, pos, total = 0, 0, 0
        for a, b in zip(ref, recs, strict=True):
            same += a["tokens"] == b["tokens"] and a["finish"] == b["finish"]
            p, t = agreement(a["tokens"], b["tokens"], a["finish"], b["finish"])
            pos += p
            total += t
        steps = [s for r in recs for s in r["decode_step_ms"]]
        out[name] = {
            "questions": len(recs),
            "accuracy": 100.0 * float(np.mean([r["correct"] for r in recs])),
            "family_accuracy": {f: 100.0 * float(np.mean(v)) for f, v in sorted(fams.items())},
            "family_counts": {f: len(v) for f, v in sorted(fams.items())},
            "sequence_agreement": same / len(recs),
            "token_agreement": pos / total if total else 1.0,
            "median_request_ms": _median([r["total_ms"] for r in recs]),
            "median_visual_ms": _median([r["visual_ms"] for r in recs]),
            "median_prefill_ms": _median([r["prefill_ms"] for r in recs]),
            "median_decode_step_ms": _median(steps),
        }
    base = out[reference]
    for s in out.values():
        s["accuracy_delta"] = s["accuracy"] - base["accuracy"]
        s["family_delta"] = {f: s["family_accuracy"][f] - base["family_accuracy"].get(f, 0.0)
                             for f in s["family_accuracy"]}
        for k in ("request", "visual", "decode_step"):
            s[f"{k}_latency_ratio"] = s[f"median_{k}_ms"] / base[f"median_{k}_ms"] if base[f"median_{k}_ms"] else None
    return out


# ---- edge-small decode step ----------------------------------------------------------------------------------


def decode_step_latency(sets: dict[str, Path], past: int, steps: int, rounds: int, threads: int,
                        progress: bool = True) -> dict[str, dict[str, float]]:
    """Median ms of one decode step (one new token, `past` tokens in the KV cache) per artifact set.

    Every set is loaded once; the rounds interleave the sets so load changes on a shared machine
    hit all of them. Random embeddings (seeded) stand in for a prompt: the cost of a step does
    not depend on the values.
    """
    from tqdm import tqdm

    from maven_edge.runtime.backends.ort_backend import OrtBackend, SessionConfig

    backends = {n: OrtBackend(p, providers=["cpu"], session_options=SessionConfig(intra_op_num_threads=threads))
                for n, p in sets.items()}
    times: dict[str, list[float]] = {n: [] for n in sets}
    rng = np.random.default_rng(0)
    cfg = next(iter(backends.values())).config
    embeds = (rng.standard_normal((1, past, cfg.llm.hidden_size)) * 0.02).astype(np.float32)
    tokens = rng.integers(0, cfg.llm.text_vocab_size, steps + 1)
    names = list(sets)
    work = [(r, names[(r + j) % len(names)]) for r in range(rounds) for j in range(len(names))]  # rotated order
    for _, name in tqdm(work, desc="decode-step latency", disable=not progress):
        be = backends[name]
        _, state = be.prefill(embeds, past + steps + 2)
        be.decode(state, int(tokens[0]))  # warm-up step
        for t in tokens[1:]:
            t0 = time.perf_counter()
            be.decode(state, int(t))
            times[name].append((time.perf_counter() - t0) * 1e3)
        state.release()
    for be in backends.values():
        be.close()
    return {n: {"median_ms": _median(v), "p90_ms": float(np.percentile(v, 90)), "steps": len(v)}
            for n, v in times.items()}


# ---- the report ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def _export_command(manifest: Any, artifacts: str) -> str:
    src = manifest.extra.get("source") or {}
    if src.get("kind") == "checkpoint":
        return f"maven-edge export --checkpoint {shown_path(str(src.get('path')))} --out {artifacts}"
    if src.get("kind") == "preset":
        return f"maven-edge export --preset {src.get('preset')} --out {artifacts}"
    return f"(artifacts {artifacts} exported through the Python API)"


def _fill_export_commands(report: dict[str, Any]) -> None:
    """Reports written before export_command existed: derive it from the artifacts' manifests."""
    for section in (report.get("model"), report.get("edge")):
        if section and not section.get("export_command") and section.get("artifacts"):
            try:
                m = load_manifest(section["artifacts"], verify=False)
                section["export_command"] = _export_command(m, section["artifacts"])
            except ArtifactError:
                pass


def render_from_json(path: str | Path) -> Path:
    """Re-write quantization.md next to `path` from an existing quantization.json (no measuring)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the report {path}: {exc}") from exc
    _fill_export_commands(report)
    out = path.with_suffix(".md")
    out.write_text(render_markdown(report))
    return out


def _model_source(manifest: Any) -> str:
    src = manifest.extra.get("source") or {}
    if src.get("kind") == "checkpoint":
        return f"trained checkpoint {src.get('path')}"
    if src.get("kind") == "preset":
        return f"random seeded weights (preset {src.get('preset')})"
    return "unknown source (exported through the Python API)"


SECTIONS = ("accuracy", "calib", "edge")


def run_report(opts: ReportOptions) -> list[Path]:
    """Measure the requested sections and write quantization.json + .md into ``opts.out``.

    With a subset of sections, the other sections are kept from the quantization.json already
    in ``opts.out`` (so one section can be re-measured without repeating the others).
    """
    opts.validate()
    t0 = time.perf_counter()
    src, out = Path(opts.artifacts), Path(opts.out)
    work = Path(opts.work) if opts.work else cache_dir("quant-report")
    jpath, mpath = out / "quantization.json", out / "quantization.md"
    sections = tuple(opts.sections)
    report: dict[str, Any] = {}
    if set(sections) != set(SECTIONS):
        if not jpath.is_file():
            raise InputError(f"--sections {','.join(sections)} updates an existing report, but {jpath} does not "
                             "exist; run all sections first")
        report = json.loads(jpath.read_text())
    manifest = load_manifest(src)
    if manifest.recipe != "fp32":
        raise InputError(f"--artifacts must be an fp32 export; {src} holds recipe {manifest.recipe!r}")
    work.mkdir(parents=True, exist_ok=True)
    if "accuracy" in sections:
        sets: dict[str, Path] = {"fp32": src}
        quant_seconds = {}
        for r in opts.recipes:
            sets[r], quant_seconds[r] = ensure_quantized(src, work / manifest.preset, r, opts.reuse,
                                                         opts.calib_samples, opts.progress)
        size_table = {name: sizes(path) for name, path in sets.items()}
        kept = _rows_kept(report, manifest, opts)
        records = evaluate_sets(sets, opts.split, opts.limit, opts.max_new_tokens, opts.threads, opts.progress)
        report.update({
            "command": _command(opts),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "model": {"preset": manifest.preset, "source": _model_source(manifest),
                      "fingerprint": manifest.extra.get("model_fingerprint"), "artifacts": str(src),
                      "export_command": _export_command(manifest, str(src))},
            "split": opts.split, "threads": opts.threads, "max_new_tokens": opts.max_new_tokens,
            "recipes": list(opts.recipes), "quantize_seconds": quant_seconds, "sizes": size_table,
            "plans": {r: load_manifest(p, verify=False).extra.get("quantization", {}).get("plan")
                      for r, p in sets.items()},
            "summary": summarize(records), "targets": TARGETS,
        })
        if kept:
            _merge_rows(report, kept)
        else:  # a whole new table: the dates of an older table's rows, and the updates this run re-measured, go
            report.pop("row_dates", None)
            report["updates"] = [u for u in report.get("updates", []) if not set(u["sections"]) <= set(sections)]
    if "calib" in sections:
        report["calibration_methods"] = calib_section(src, work, opts)
    if "edge" in sections and opts.edge_artifacts:
        report["edge"] = edge_section(Path(opts.edge_artifacts), work, opts)
    if set(sections) != set(SECTIONS):
        report.setdefault("updates", []).append(
            {"sections": list(sections), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": _command(opts)})
    _fill_export_commands(report)
    report["checks"] = checks(report)
    elapsed = time.perf_counter() - t0
    report["seconds"] = round(elapsed, 1)  # the last command's
    out.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(report, indent=2, default=float) + "\n")
    mpath.write_text(render_markdown(report))
    return [mpath, jpath]


_ROW_TABLES = ("summary", "sizes", "plans", "quantize_seconds")


def _rows_kept(report: dict[str, Any], manifest: Any, opts: ReportOptions) -> dict[str, Any]:
    """When an existing report is updated (--sections accuracy) for some of its recipes only, the rows of
    the others are kept: the same model, split and settings, so their accuracies still stand; their
    latency ratios stay those against the fp32 of the run that measured them. {} = a whole new table."""
    old = [r for r in report.get("recipes", []) if r not in opts.recipes]
    if not old or "summary" not in report:
        return {}
    same = {"model fingerprint": (report["model"].get("fingerprint"), manifest.extra.get("model_fingerprint")),
            "split": (report.get("split"), opts.split), "max new tokens": (report.get("max_new_tokens"),
                                                                           opts.max_new_tokens),
            "questions": (report["summary"]["fp32"]["questions"],
                          opts.limit if opts.limit else report["summary"]["fp32"]["questions"])}
    differ = [f"{k} {a} != {b}" for k, (a, b) in same.items() if a != b]
    if differ:
        raise InputError(f"the report in {opts.out} was measured with other settings ({'; '.join(differ)}), so its "
                         f"rows for {', '.join(old)} cannot be kept beside new ones: add them to --recipes")
    return {"recipes": report["recipes"], "measured": report.get("row_dates", {}),
            "header": {k: report[k] for k in ("command", "date", "machine", "threads") if k in report},
            **{t: {r: report[t][r] for r in ("fp32", *old) if r in report.get(t, {})} for t in _ROW_TABLES}}


def _merge_rows(report: dict[str, Any], kept: dict[str, Any]) -> None:
    """Put the kept rows back beside this run's, in the old report's order, and date each row. The page's
    header (command, date, machine) and the fp32 row stay those of the run that made the table; the
    update is listed with its command."""
    date, new = report["date"], list(report["recipes"])
    order = [r for r in kept["recipes"] if r in new or r in kept["summary"]] + [r for r in new if r not in kept["recipes"]]
    for t in _ROW_TABLES:
        rows = {**report[t], **{r: v for r, v in kept[t].items() if r not in new}}
        report[t] = {r: rows[r] for r in ["fp32", *order] if r in rows}
    report.update(kept["header"])
    report["recipes"] = order
    report["row_dates"] = {r: (date if r in new else kept["measured"].get(r, kept["header"].get("date")))
                           for r in order}


def calib_section(src: Path, work: Path, opts: ReportOptions) -> dict[str, Any]:
    """int8-static with each calibration method: per-component error vs fp32 on test-split images.

    Every component gets fp32 inputs (so errors do not compound): relative L2 of float outputs,
    mismatch rate of the discrete codes and of the kept-patch indices."""
    from maven_edge.calibration.quantize import CALIB_METHODS, QuantizeOptions, parity, quantize_artifacts
    from maven_edge.calibration.readers import ComponentFeeds, synthetic_calibration_set

    manifest = load_manifest(src)
    cfg = manifest.maven_config()
    test = synthetic_calibration_set(manifest.preprocess, opts.calib_test_samples, opts.split,
                                     patch_size=cfg.vision.patch_size, preset=manifest.preset)
    feeds = ComponentFeeds(src, test, manifest, threads=opts.threads)
    rows: dict[str, Any] = {}
    try:
        for method in CALIB_METHODS:
            out = work / manifest.preset / f"calib-{method}"
            t0 = time.perf_counter()
            quantize_artifacts(src, out, QuantizeOptions(recipe="int8-static", calib_method=method,
                                                         calib_samples=opts.calib_samples, force=True,
                                                         progress=opts.progress, check_samples=0))
            seconds = time.perf_counter() - t0
            errors = {}
            for comp in ("vision_encoder", "discrete_tokenizer", "patch_selector", "projector"):
                if comp in manifest.components:
                    f = manifest.components[comp].file.path
                    errors[comp] = parity(src / f, out / f, feeds.feeds(comp))
            rows[method] = {"seconds": round(seconds, 1), "errors": errors}
    finally:
        feeds.close()
    return {"split": opts.split, "test_samples": test.num_samples, "test_images": test.num_images,
            "calib_samples": opts.calib_samples, "methods": rows}


def edge_section(src: Path, work: Path, opts: ReportOptions) -> dict[str, Any]:
    manifest = load_manifest(src)
    if manifest.recipe != "fp32":
        raise InputError(f"--edge-artifacts must be an fp32 export; {src} holds recipe {manifest.recipe!r}")
    sets: dict[str, Path] = {"fp32": src}
    seconds = {}
    for r in opts.edge_recipes:
        sets[r], seconds[r] = ensure_quantized(src, work / manifest.preset, r, opts.reuse, opts.calib_samples,
                                               opts.progress)
    size_table = {name: sizes(path) for name, path in sets.items()}
    latency = decode_step_latency(sets, opts.edge_past, opts.edge_steps, opts.edge_rounds, opts.threads, opts.progress)
    base = latency["fp32"]["median_ms"]
    for v in latency.values():
        v["speedup_vs_fp32"] = base / v["median_ms"] if v["median_ms"] else None
    dec32 = size_table["fp32"]["decoder"]
    return {
        "preset": manifest.preset, "source": _model_source(manifest), "artifacts": str(src),
        "export_command": _export_command(manifest, str(src)),
        "sizes": size_table, "decoder_ratio": {n: s["decoder"] / dec32 for n, s in size_table.items()},
        "decode_step": latency, "past": opts.edge_past, "steps_per_round": opts.edge_steps,
        "rounds": opts.edge_rounds, "quantize_seconds": seconds,
        "llm": manifest.config["llm"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": _command(opts),
    }


def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    s, t = report["summary"], report["targets"]
    out = []

    def add(name: str, value: Any, target: str, ok: bool | None) -> None:
        out.append({"check": name, "value": value, "target": target, "ok": ok})

    for recipe, limit in (("int8-static", t["int8_static_max_drop"]), ("int4-weight", t["int4_max_drop"]),
                          ("int8-int4", t["int4_max_drop"])):
        if recipe in s:
            drop = -s[recipe]["accuracy_delta"] + 0.0  # no "-0.0"
            add(f"{recipe} accuracy drop vs fp32 (points, {report['model']['preset']})", round(drop, 2),
                f"<= {limit}", drop <= limit)
    edge = report.get("edge")
    if edge and "int4-weight" in edge["decoder_ratio"]:
        r = edge["decoder_ratio"]["int4-weight"]
        add(f"{edge['preset']} int4 decoder file / fp32", round(r, 4), f"<= {t['int4_decoder_max_ratio']}",
            r <= t["int4_decoder_max_ratio"])
        sp = edge["decode_step"]["int4-weight"]["speedup_vs_fp32"]
        add(f"{edge['preset']} int4 decode step speed-up vs fp32 (x)", round(sp, 2), "> 1", sp > 1.0)
    return out


def _command(opts: ReportOptions) -> str:
    parts = ["maven-edge quantize-report", f"--artifacts {opts.artifacts}", f"--out {opts.out}",
             *([f"--work {opts.work}"] if opts.work else []), f"--recipes {','.join(opts.recipes)}",
             f"--split {opts.split}", f"--threads {opts.threads}"]
    if tuple(opts.sections) != SECTIONS:
        parts.append(f"--sections {','.join(opts.sections)}")
    if opts.limit:
        parts.append(f"--limit {opts.limit}")
    if opts.max_new_tokens != DEFAULT_MAX_NEW_TOKENS:
        parts.append(f"--max-new-tokens {opts.max_new_tokens}")
    if opts.edge_artifacts:
        parts += [f"--edge-artifacts {opts.edge_artifacts}", f"--edge-recipes {','.join(opts.edge_recipes)}"]
    return " ".join(parts)


# ---- markdown ----------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.2f}x"


def _local(text: str) -> str:
    """Paths under the working directory, shown relative to it."""
    return str(text).replace(str(Path.cwd()) + os.sep, "")


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    names = list(s)
    fams = list(next(iter(s.values()))["family_accuracy"])
    m = report["machine"]
    exports = [report["model"].get("export_command")]
    if report.get("edge"):
        exports.append(report["edge"].get("export_command"))
    fp = report["model"].get("fingerprint")
    lines = [
        "# Quantization: accuracy, size and latency",
        "",
        "Generated on " + report["date"] + f" ({m['cpu']}, {m['cores']} cores visible, onnxruntime "
        f"{m['onnxruntime']}, {report['threads']} intra-op threads) by",
        "",
        "```bash",
        *[e for e in exports if e],
        report["command"],
        "```",
        "",
        "Re-run these to re-create this page and `quantization.json` (raw numbers); "
        "`maven-edge quantize-report --render-only docs/quantization.json` re-writes the page from the JSON.",
        *[f"Section(s) {', '.join(u['sections'])} re-measured on {u['date']} by `{u['command']}`."
          for u in report.get("updates", [])],
        "",
        f"Model: `{report['model']['preset']}`, {_local(report['model']['source'])}"
        + (f" (weights fingerprint `{fp[:12]}`)" if fp else "") + ". Evaluation: "
        f"{s['fp32']['questions']} questions of the `{report['split']}` split, answered by the runtime "
        "pipeline (onnxruntime CPU, greedy, at most "
        f"{report['max_new_tokens']} new tokens), exact match after lower-casing and whitespace "
        "normalisation (as `maven-edge eval`). Calibration: the synthetic validation split (never the test split).",
        "",
        "Recipes (components not listed stay fp32): "
        + "; ".join(f"**{r}**: " + ", ".join(f"{c}={m_}" for c, m_ in (p or {}).items() if m_ != "fp32")
                    for r, p in report["plans"].items() if r != "fp32") + ".",
        "",
        "## Accuracy",
        "",
        "| recipe | overall | " + " | ".join(fams) + " | Δ overall (points) | same answer tokens | token agreement |",
        "|---|---|" + "---|" * len(fams) + "---|---|---|",
    ]
    for n in names:
        x = s[n]
        fam = " | ".join(f"{x['family_accuracy'][f]:.1f} ({x['family_delta'][f]:+.1f})" if n != "fp32"
                         else f"{x['family_accuracy'][f]:.1f}" for f in fams)
        lines.append(f"| {n} | {x['accuracy']:.1f} | {fam} | {x['accuracy_delta']:+.1f} | "
                     f"{100 * x['sequence_agreement']:.1f}% | {100 * x['token_agreement']:.1f}% |")
    by_date: dict[str, list[str]] = {}
    for r, d in report.get("row_dates", {}).items():
        by_date.setdefault(d, []).append(r)
    if len(by_date) > 1:
        lines += ["", "Rows measured in separate runs (latency ratios against the fp32 of the same run; accuracy "
                  "and agreement are deterministic): " + "; ".join(f"{d}: {', '.join(rs)}" for d, rs in by_date.items())
                  + "."]
    lines += [
        "",
        "Accuracy in %, per family with the change vs fp32 in points. *Same answer tokens*: share of "
        "questions whose greedy token sequence (and stop reason) equals fp32's. *Token agreement*: share "
        "of fp32's answer positions (incl. its stop) reproduced before the first divergence.",
        "",
        "## Size",
        "",
    ]
    comps = list(report["sizes"]["fp32"])
    lines.append("| recipe | " + " | ".join(comps) + " | total MB | vs fp32 |")
    lines.append("|---|" + "---|" * (len(comps) + 2))
    tot32 = sum(report["sizes"]["fp32"].values())
    for n, sz in report["sizes"].items():
        tot = sum(sz.values())
        lines.append(f"| {n} | " + " | ".join(_mb(sz[c]) for c in comps) + f" | {_mb(tot)} | {tot / tot32:.2f} |")
    lines += [
        "",
        "File sizes in MB (ONNX file + external data).",
        "",
        "## CPU latency",
        "",
        "| recipe | request ms (median) | vs fp32 | vision side ms | vs fp32 | decode step ms | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        x = s[n]
        lines.append(f"| {n} | {x['median_request_ms']:.1f} | {_ratio(x['request_latency_ratio'])} | "
                     f"{x['median_visual_ms']:.1f} | {_ratio(x['visual_latency_ratio'])} | "
                     f"{x['median_decode_step_ms']:.2f} | {_ratio(x['decode_step_latency_ratio'])} |")
    lines += [
        "",
        "Ratios are quantized / fp32 time (below 1 = faster). The recipes run interleaved, sample by sample, "
        "with the order rotated (the first call after a pause is slower), on a machine shared with other jobs: "
        "treat differences under ~15% as noise. fp16 is a GPU recipe "
        "(CUDA / TensorRT); on a CPU without native fp16 kernels it is expected to be slower.",
    ]
    cm = report.get("calibration_methods")
    if cm:
        lines += [
            "",
            "## Calibration methods (int8-static)",
            "",
            f"The int8-static vision side calibrated with each method on {cm['calib_samples']} validation samples, "
            f"then run on {cm['test_images']} images of {cm['test_samples']} `{cm['split']}` samples with fp32 "
            "inputs per component (errors do not compound): relative L2 error of the float outputs, and the "
            "share of discrete codes and kept patches that differ from fp32.",
            "",
            "| method | vision features rel. L2 | codes changed | kept patches changed | kept embeds rel. L2 | "
            "projector rel. L2 | calibration + quantization s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, row in cm["methods"].items():
            e = row["errors"]

            def g(comp: str, key: str, pct: bool = False, e: dict[str, Any] = e) -> str:
                v = e.get(comp, {}).get(key)
                return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.4f}")

            lines.append(f"| {method} | {g('vision_encoder', 'patch_features.rel_l2')} | "
                         f"{g('discrete_tokenizer', 'visual_codes.mismatch', True)} | "
                         f"{g('patch_selector', 'selected_indices.mismatch', True)} | "
                         f"{g('patch_selector', 'selected_embeds.rel_l2')} | {g('projector', 'projected_embeds.rel_l2')} | "
                         f"{row['seconds']:.0f} |")
    edge = report.get("edge")
    if edge:
        llm = edge["llm"]
        lines += [
            "",
            f"## {edge['preset']}: decoder size and decode step",
            "",
            f"Decoder: hidden {llm['hidden_size']}, {llm['num_layers']} layers, {llm['num_heads']} heads "
            f"({llm['num_kv_heads']} KV), {edge['source']}. Decode step = one new token with {edge['past']} "
            f"tokens in the KV cache, through the runtime's onnxruntime backend (IOBinding KV cache); median "
            f"over {edge['rounds']} interleaved rounds of {edge['steps_per_round']} steps."
            + (f" Measured on {edge['date']} by `{_local(edge['command'])}`." if edge.get("date") else ""),
            "",
            "| recipe | decoder MB | decoder / fp32 | all files MB | step ms (median) | p90 ms | speed-up vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, sz in edge["sizes"].items():
            d = edge["decode_step"][n]
            lines.append(f"| {n} | {_mb(sz['decoder'])} | {edge['decoder_ratio'][n]:.3f} | {_mb(sum(sz.values()))} | "
                         f"{d['median_ms']:.1f} | {d['p90_ms']:.1f} | {d['speedup_vs_fp32']:.2f}x |")
    lines += ["", "## Targets", "", "| check | measured | target | met |", "|---|---|---|---|"]
    for c in report["checks"]:
        ok = "yes" if c["ok"] else ("no" if c["ok"] is not None else "-")
        lines.append(f"| {c['check']} | {c['value']} | {c['target']} | {ok} |")
    if not edge:
        lines += ["", "The edge-small section was not run (pass `--edge-artifacts`)."]
    lines += ["", f"Run time of the last command that updated this page: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def options_dict(opts: ReportOptions) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}

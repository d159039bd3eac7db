"""The paper's Table 4 on our model, at the full training budget: which granularity of visual tokens
buys accuracy.

From one training run's stage-3 weights, stage 4 is re-run once per variant and sample stream with
exactly the recipe's stage-4 config (steps, batch, schedule, follow-ups, attention targets); only the
visual encoding and the stream's seed change:

* ``hybrid``           codes + the selector's kept patches (keep 0.25): the recipe itself
* ``discrete``         codes only
* ``continuous``       every patch (LLaVA-style)
* ``continuous-grid``  as many patches as hybrid has visual tokens, a fixed evenly spread subset
                       (:func:`~maven_edge.model_src.train.common.grid_patches`): "more tokens"
                       against "better tokens" at an equal visual-token count

Stream k draws its stage-4 batches (and follow-ups) with seed ``run seed + recipe seed_offset +
STREAM_SEED_STEP * k``; stream 0 is the recipe's own stream, so ``hybrid`` stream 0 *is* the run's
stage 4 when the run has one with the same config (reused, not retrained). Each finished
(variant, stream) leaves ``result.json``, ``predictions.jsonl`` and ``final/`` (the weights) in
``RUN/table4-x<scale>/<variant>-s<k>/``; a stopped command resumes where it stopped (finished rows are
skipped, an unfinished stage 4 resumes from its last checkpoint). If the run has no stage 3 yet,
stages 0-3 are trained first (also resumable).

Comparisons (:func:`compare`) are paired over the test questions: the standard error of a
difference combines the per-question spread of the (stream-averaged) correctness difference with
the spread between streams.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from maven_edge.core.errors import TrainingError
from maven_edge.core.manifest import sha256_file

VARIANTS: dict[str, tuple[str, bool]] = {  # name -> (mode, fixed patch subset of hybrid's token count)
    "hybrid": ("hybrid", False),
    "discrete": ("discrete", False),
    "continuous": ("continuous", False),
    "continuous-grid": ("continuous", True),
}
STREAM_SEED_STEP = 100
DEFAULT_STREAMS = 2
#: families and slices reported per variant: (key in a result, column label)
SLICES: tuple[tuple[str, str], ...] = (("single", "single"), ("multi", "multi"), ("multi 5-8", "multi, 5-8 images"),
                                       ("caption", "captions"), ("video", "video"), ("overall", "overall"))


def work_dir(run: Path, steps_scale: float) -> Path:
    return run / f"table4-x{steps_scale:g}"


def _stage_seed(run: Path) -> int:
    meta = json.loads((run / "stage3" / "stage.json").read_text())
    return int(meta.get("seed", 0))


def ensure_stage3(run: Path, preset: str, quiet: bool) -> None:
    """Train stages 0-3 into `run` if its stage 3 is missing (resuming whatever is there)."""
    if (run / "stage3" / "stage.json").is_file():
        return
    from maven_edge.model_src.train.stages import train

    for st in ("0", "1", "2", "3"):
        if not (run / f"stage{st}" / "stage.json").is_file():
            tqdm.write(f"table4: {run} has no stage {st} yet; training it (resumable)")
            train(preset, st, run, resume=True, quiet=quiet, final_eval=False)


def row_dir(run: Path, steps_scale: float, variant: str, stream: int | str) -> Path:
    """Where one (variant, stream) keeps result.json, predictions.jsonl, final/ and its stage-4 state."""
    return work_dir(run, steps_scale) / f"{variant}-s{stream}"


def stage3_fingerprint(run: Path) -> str:
    """sha256 of the run's stage-3 weights: every row records the weights its stage 4 started from."""
    return sha256_file(run / "stage3" / "model.safetensors")


def restore_reported_rows(run: Path, steps_scale: float, reported: dict[str, Any] | None) -> list[str]:
    """Rows a report (ablations.json's compact `table4`) holds for this run and scale whose row
    directory is gone, written back as ``result.json`` so they count as finished: a fresh clone keeps
    docs/ablations.json but not artifacts/, and hours of training must not be redone. A row whose
    recorded stage-3 fingerprint differs from the run's stage 3 (retrained on another CPU, whose kernels
    round differently) is restored with a warning: the report lists the fingerprints, so a table whose
    rows did not all start from one set of weights says so. Returns the restored row keys."""
    if not reported or reported.get("run") != str(run) or float(reported.get("steps_scale", -1)) != steps_scale:
        return []
    from maven_edge.model_src.train.loop import atomic_write_text

    current = stage3_fingerprint(run)
    restored = []
    for key, r in reported.get("rows", {}).items():
        variant, _, stream = key.rpartition("/s")
        d = row_dir(run, steps_scale, variant, stream)
        if variant not in VARIANTS or not stream.isdigit() or (d / "result.json").is_file():
            continue
        if r.get("stage3_sha256") not in (None, current):
            tqdm.write(f"table4: warning: the report's row {key} started from other stage-3 weights than "
                       f"{run}/stage3 (sha256 {r['stage3_sha256'][:12]}… against {current[:12]}…); rows trained "
                       "now start from the latter, and the report lists both")
        families, images, tasks = _questions(reported, r)
        full = {**r, "correct": _correct(r), "families": families, "images": images,
                **({"tasks": tasks} if tasks is not None else {})}
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "result.json", json.dumps(full, indent=2) + "\n")
        restored.append(key)
    return restored


def check_variants(variants: Sequence[str]) -> None:
    """A TrainingError naming the first name that is not a table4 variant."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise TrainingError(f"unknown table4 variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")


def variant_config(variant: str, stream: int, steps_scale: float, hybrid_tokens: int):
    """The recipe's `4-instruct` config for one (variant, stream) (the ablation trains that phase, not 4-count)."""
    from maven_edge.model_src.train.recipe import get_recipe

    check_variants([variant])
    mode, grid = VARIANTS[variant]
    base = get_recipe("tiny")["4-instruct"].scaled(steps_scale)
    return dataclasses.replace(base, mode=mode, patch_subset=hybrid_tokens if grid else 0,
                               seed_offset=base.seed_offset + STREAM_SEED_STEP * stream)


def _reusable_stage4(run: Path, cfg, seed: int) -> dict[str, Any] | None:
    """The run's own stage 4 when it is exactly this (variant, stream)'s training, else None (knobs
    added to the config after that run count as their defaults, as when a phase resumes). A stage 4
    that went on after 4-instruct (the recipe's 4-count since run R36S) is not: its final weights are
    not 4-instruct's."""
    from maven_edge.model_src.train.loop import same_config

    meta_path = run / "stage4" / "stage.json"
    if not (meta_path.is_file() and (run / "final" / "model.safetensors").is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if list(meta.get("recipe", {})) != ["4-instruct"]:
        return None
    same = same_config(meta.get("recipe", {}).get("4-instruct"), cfg)
    if not same or int(meta.get("seed", -1)) + cfg.seed_offset != seed or meta.get("init"):
        return None
    return meta


def run_row(run: Path, variant: str, stream: int, steps_scale: float, limit: int | None, quiet: bool) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (variant, stream); returns its result (cached in result.json)."""
    from maven_edge.model_src.checkpoint import load_checkpoint, load_config, save_checkpoint
    from maven_edge.model_src.train.evaluate import evaluate, write_predictions
    from maven_edge.model_src.train.loop import atomic_write_text, run_phase
    from maven_edge.model_src.train.stages import phase_llm

    d = row_dir(run, steps_scale, variant, stream)
    result_path = d / "result.json"
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("limit") == limit:
            return done
    d.mkdir(parents=True, exist_ok=True)
    cfg = variant_config(variant, stream, steps_scale, load_config(run / "stage3").visual_tokens_per_image("hybrid"))
    seed = _stage_seed(run) + cfg.seed_offset
    reused = _reusable_stage4(run, cfg, seed)
    if reused is not None:
        model = load_checkpoint(run / "final")
        train_time, source = float(reused["wall_time_s"]), str(run / "stage4")
    else:
        model = load_checkpoint(run / "stage3")
        model.train()
        phase = phase_llm(model, cfg, seed, "4-instruct", ("llm", "projector"), ("embed", "projector"))
        summary = run_phase(phase, d / "4-instruct", resume=True, quiet=quiet)
        train_time, source = float(summary["wall_time_s"]), None
        model.eval()
        save_checkpoint(model, d / "final")
    rep = evaluate(model, "test", cfg.mode, limit=limit, quiet=quiet, return_predictions=True,
                   patch_subset=cfg.patch_subset)
    preds = rep.pop("predictions")
    write_predictions(d / "predictions.jsonl", preds)
    result = {"variant": variant, "stream": stream, "mode": cfg.mode, "patch_subset": cfg.patch_subset or None,
              "steps": cfg.steps, "seed": seed, "train_time_s": train_time, "reused_stage4": source, "limit": limit,
              "stage3_sha256": stage3_fingerprint(run),
              "correct": [int(p["correct"]) for p in preds], "families": [p["family"] for p in preds],
              "images": [p["images"] for p in preds], "tasks": [p["task"] for p in preds], **rep}
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def _with_tasks(result: dict[str, Any], d: Path) -> dict[str, Any]:
    """A result written before rows recorded each question's task: read them from its predictions."""
    if "tasks" not in result and (d / "predictions.jsonl").is_file():
        preds = [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines() if line.strip()]
        result["tasks"] = [p["task"] for p in preds]
    return result


def finished_table(run: Path, steps_scale: float = 1.0, streams: int = DEFAULT_STREAMS,
                   limit: int | None = None) -> dict[str, Any]:
    """The table as far as its rows have finished (nothing is trained)."""
    table: dict[str, Any] = {"run": str(run), "steps_scale": steps_scale, "streams": streams, "rows": {}}
    for v in VARIANTS:
        for k in range(streams):
            p = row_dir(run, steps_scale, v, k) / "result.json"
            result = json.loads(p.read_text()) if p.is_file() else None
            if result is not None and result.get("limit") == limit:
                table["rows"][f"{v}/s{k}"] = _with_tasks(result, p.parent)
    return table


def table4_full(run: Path, steps_scale: float = 1.0, streams: int = DEFAULT_STREAMS, limit: int | None = None,
                quiet: bool = False, variants: tuple[str, ...] = tuple(VARIANTS), preset: str = "tiny",
                on_row: Callable[[dict[str, Any]], None] | None = None,
                reported: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every (variant, stream) of the table, resumable; `on_row` sees the partial table after each row.
    `reported` is the table as a report last held it: its rows whose directories are gone count as
    finished (:func:`restore_reported_rows`)."""
    if streams < 1:
        raise TrainingError(f"--streams must be >= 1, got {streams}")
    check_variants(variants)
    ensure_stage3(run, preset, quiet)
    restored = restore_reported_rows(run, steps_scale, reported)
    if restored and not quiet:
        tqdm.write(f"table4: {len(restored)} finished row(s) taken from the report: {', '.join(restored)}")
    table = finished_table(run, steps_scale, streams, limit)  # rows other invocations finished stay in
    todo = [(v, k) for k in range(streams) for v in variants]  # stream 0 of every variant first
    bar = tqdm(todo, desc="table4", unit="run", disable=quiet)
    for variant, k in bar:
        bar.set_postfix_str(f"{variant} stream {k}")
        table["rows"][f"{variant}/s{k}"] = run_row(run, variant, k, steps_scale, limit, quiet)
        table["rows"] = {f"{v}/s{j}": table["rows"][f"{v}/s{j}"] for v in VARIANTS for j in range(streams)
                         if f"{v}/s{j}" in table["rows"]}
        if on_row is not None:
            on_row(table)
    return table


def compact(table: dict[str, Any]) -> dict[str, Any]:
    """The table as ablations.json keeps it: each row's per-question correctness as a 0/1 string and
    the questions' family and image count once (the paired comparisons need them), without the
    per-question predictions (those stay in each row's predictions.jsonl)."""
    rows, questions = {}, None
    for key, r in table["rows"].items():
        r = dict(r)
        if isinstance(r.get("correct"), list):
            r["correct"] = "".join(str(int(c)) for c in r["correct"])
        fam, imgs, tasks = r.pop("families", None), r.pop("images", None), r.pop("tasks", None)
        if fam is not None and (questions is None or ("tasks" not in questions and tasks is not None)):
            questions = {"families": ",".join(fam), "images": ",".join(map(str, imgs)),
                         **({"tasks": ",".join(tasks)} if tasks is not None else {})}
        rows[key] = r
    return {**table, "rows": rows, "questions": questions or table.get("questions")}


def _questions(table: dict[str, Any], row: dict[str, Any]) -> tuple[list[str], list[int], list[str] | None]:
    """Each test question's family, image count and task (None if unknown): from the compact
    table's comma-joined `questions`, or from a full row."""
    q = table.get("questions")
    if q:
        split = {k: v.split(",") if isinstance(v, str) else list(v) for k, v in q.items()}
        return split["families"], [int(x) for x in split["images"]], split.get("tasks")
    return row["families"], row["images"], row.get("tasks")


def _correct(r: dict[str, Any]) -> list[int]:
    c = r["correct"]
    return [int(x) for x in c] if isinstance(c, str) else list(c)


# ---- statistics ----------------------------------------------------------------------------------
def slice_of(result: dict[str, Any], key: str) -> float | None:
    if key == "overall":
        return result["accuracy"]
    if key == "multi 5-8":
        return result.get("image_bucket_accuracy", {}).get("5-8", {}).get("multi")
    return result["family_accuracy"].get(key)


def variant_summary(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """Mean over streams, the between-stream standard error and the test-split one (binomial)."""
    vals = [v for v in (slice_of(r, key) for r in rows) if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    stream_se = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
                 if len(vals) > 1 else None)
    n = _slice_count(rows[0], key)
    test_se = math.sqrt(mean * (1 - mean) / n / len(vals)) if n else None
    return {"mean": mean, "stream_se": stream_se, "test_se": test_se, "streams": len(vals), "n": n}


def _slice_count(result: dict[str, Any], key: str) -> int:
    if key == "overall":
        return int(result["num_questions"])
    if key == "multi 5-8":
        return int(result.get("image_bucket_counts", {}).get("5-8", {}).get("multi", 0))
    return int(result.get("family_counts", {}).get(key, 0))


def compare(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], families: list[str],
            images: list[int], key: str) -> dict[str, float] | None:
    """Paired difference a - b on slice `key`: the mean, and its standard error from the questions
    (per-question difference of stream-averaged correctness) and from the streams."""
    keep = _slice_mask(families, images, key)
    if not keep:
        return None

    def per_question(rows: list[dict[str, Any]]) -> list[float]:
        cs = [_correct(r) for r in rows]
        return [sum(c[i] for c in cs) / len(cs) for i in keep]

    d = [x - y for x, y in zip(per_question(a_rows), per_question(b_rows), strict=True)]
    n = len(d)
    mean = sum(d) / n
    q_se = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, n - 1) / n)

    def stream_var(rows: list[dict[str, Any]]) -> float:
        if len(rows) < 2:
            return 0.0
        accs = [sum(c[i] for i in keep) / n for c in (_correct(r) for r in rows)]
        m = sum(accs) / len(accs)
        return sum((x - m) ** 2 for x in accs) / (len(accs) - 1) / len(accs)

    s_se = math.sqrt(stream_var(a_rows) + stream_var(b_rows))
    return {"diff": mean, "se": math.sqrt(q_se**2 + s_se**2), "question_se": q_se, "stream_se": s_se, "n": n}


def _slice_mask(families: list[str], images: list[int], key: str) -> list[int]:
    if key == "overall":
        return list(range(len(families)))
    if key == "multi 5-8":
        return [i for i, (f, k) in enumerate(zip(families, images, strict=True)) if f == "multi" and k >= 5]
    return [i for i, f in enumerate(families) if f == key]


def disagreements(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], tasks: list[str]
                  ) -> dict[str, tuple[float, float]]:
    """Per task: (questions a gets right and b not, the reverse), with each question's correctness
    averaged over the streams (whole counts for one stream each)."""
    ca, cb = [_correct(r) for r in a_rows], [_correct(r) for r in b_rows]
    out: dict[str, tuple[float, float]] = {}
    for i, t in enumerate(tasks):
        x = sum(c[i] for c in ca) / len(ca) - sum(c[i] for c in cb) / len(cb)
        a, b = out.get(t, (0.0, 0.0))
        out[t] = (a + max(x, 0.0), b + max(-x, 0.0))
    return out


def verdict(c: dict[str, float]) -> str:
    """'ahead' / 'behind' when the difference is beyond two standard errors, else 'tied'."""
    if c["diff"] > 2 * c["se"]:
        return "ahead"
    if c["diff"] < -2 * c["se"]:
        return "behind"
    return "tied"


# ---- report --------------------------------------------------------------------------------------
def _by_variant(table: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in table["rows"].values():
        out.setdefault(r["variant"], []).append(r)
    return out


def _cell(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "–"
    s_se, t_se = summary["stream_se"], summary["test_se"]
    return (f"{100 * summary['mean']:.1f} ± " + ("–" if s_se is None else f"{100 * s_se:.1f}")
            + ("" if t_se is None else f" / {100 * t_se:.1f}"))


def render(table: dict[str, Any], command: str) -> list[str]:
    """Markdown lines: per-variant table, hybrid against each other variant, per task, commands."""
    by = _by_variant(table)
    total = len(VARIANTS) * table["streams"]
    done = len(table["rows"])
    any_row = next(iter(table["rows"].values()), None)
    steps = any_row["steps"] if any_row else "?"
    lines = ["## Table 4 analogue: granularity of the visual tokens, full stage-4 budget", "",
             f"From the stage-3 weights of `{table['run']}`, each variant runs the recipe's stage-4 `4-instruct` phase "
             f"({steps} steps, same batch, schedule, follow-ups and attention targets; not the shorter `4-count` "
             "phase that follows it in the recipe since run R36S) on each sample stream, then is evaluated in its "
             "own mode on the test split. Cells: exact match (%), mean over streams ± its standard error between "
             "streams (– with one stream) / the test split's (binomial, over the slice's questions and the streams)."
             f" **{done} of {total} runs done**" + (" (the rest: run the command again; it resumes)." if
                                                             done < total else "."), ""]
    trained = [r["train_time_s"] for r in table["rows"].values()]
    if trained:
        per = sum(trained) / len(trained)
        lines += [f"Time: stage 4 took {sum(trained) / 3600:.1f} h over the {done} finished runs (measured, two "
                  f"threads, {per / 60:.0f} min each on average, plus a few minutes of evaluation each)"
                  + (f"; the remaining {total - done} would take about {(total - done) * per / 3600:.0f} h more at "
                     "that rate (an estimate)." if done < total else ".")
                  + " From a fresh clone the command first trains the run's stages 0–3 (16 min for R36F on two "
                  "threads of an idle machine); rows this report already holds are taken from it, not retrained.", ""]
    shas = [r["stage3_sha256"] for r in table["rows"].values() if r.get("stage3_sha256")]
    if shas:
        lines += [f"Stage-3 weights: {len(shas)} of the {done} rows record the sha256 of the weights their stage 4 "
                  "started from: " + ", ".join(f"`{h[:12]}…`" for h in sorted(set(shas)))
                  + (" (all the same)." if len(set(shas)) == 1 else " (**differ**: not one starting point).")
                  + " Rows written before the fingerprint was recorded have none.", ""]
    head = "| variant | streams | visual tokens / image | mean prefill tokens | " + " | ".join(
        lab for _, lab in SLICES) + " | stage-4 wall time / stream |"
    lines += [head, "|" + "---|" * (4 + len(SLICES) + 1)]
    for v in VARIANTS:
        rows = by.get(v)
        if not rows:
            continue
        tokens = rows[0]["visual_tokens_per_image"]
        prefill = sum(r["mean_prefill_tokens"] for r in rows) / len(rows)
        wall = sum(r["train_time_s"] for r in rows) / len(rows) / 60
        lines.append(f"| {v} | {len(rows)} | {tokens} | {prefill:.1f} | "
                     + " | ".join(_cell(variant_summary(rows, k)) for k, _ in SLICES) + f" | {wall:.0f} min |")
    h = by.get("hybrid")
    others = [v for v in VARIANTS if v != "hybrid" and v in by]
    if h and others:
        fam, imgs, task_of = _questions(table, h[0])
        lines += ["", "Hybrid minus each other variant, paired over the same test questions (points; ± one standard "
                  "error from the questions and the streams; *ahead* / *behind* beyond two standard errors, else "
                  "*tied*):", "", "| hybrid minus | " + " | ".join(lab for _, lab in SLICES) + " |",
                  "|---|" + "---|" * len(SLICES)]
        plain = []
        for v in others:
            cells, says = [], {"ahead": [], "tied": [], "behind": []}
            for k, lab in SLICES:
                c = compare(h, by[v], fam, imgs, k)
                cells.append("–" if c is None else f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} ({verdict(c)})")
                if c is not None:
                    says[verdict(c)].append(f"{lab} ({100 * c['diff']:+.1f})")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
            plain.append(f"Against {v}, hybrid is " + "; ".join(f"{w} on {', '.join(x)}" for w, x in says.items() if x)
                         + ".")
        partial = "" if done == total else f" (from {done} of {total} runs; the verdicts can change as streams finish)"
        lines += ["", f"**In plain words{partial}:** " + " ".join(plain)]
        if task_of:
            lines += ["", "Which questions each side gets right and the other not (counts over the test questions, "
                      "each question weighted by its stream-averaged correctness; per task in brackets: hybrid "
                      "only / the other only):", "", "| hybrid against | hybrid only | other only | per task |",
                      "|---|---|---|---|"]
            for v in others:
                split = disagreements(h, by[v], task_of)
                tot_h = sum(a for a, _ in split.values())
                tot_o = sum(b for _, b in split.values())
                detail = ", ".join(f"{t} {a:.0f}/{b:.0f}" for t, (a, b) in sorted(split.items()) if a or b)
                lines.append(f"| {v} | {tot_h:.0f} | {tot_o:.0f} | {detail} |")
    tasks = sorted({t for rows in by.values() for r in rows for t in r["task_accuracy"]})
    if tasks:
        lines += ["", "Per task (mean over streams, %):", "", "| variant | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for v in VARIANTS:
            if v in by:
                accs = [[r["task_accuracy"].get(t) for r in by[v]] for t in tasks]
                lines.append(f"| {v} | " + " | ".join(
                    "–" if None in a else f"{100 * sum(a) / len(a):.1f}" for a in accs) + " |")
        recalls = [[r.get("named_patch_recall", {}).get(t) for r in by.get("hybrid", [])] for t in tasks]
        if recalls and all(a and None not in a for a in recalls):
            lines.append("| hybrid's selector: named objects' patches kept | " + " | ".join(
                f"{100 * sum(a) / len(a):.0f}" for a in recalls) + " |")
    lines += ["", "Rows reproduce with one command each (all of them: leave out `--variant`):", ""]
    for v in VARIANTS:
        reused = [r for r in by.get(v, []) if r.get("reused_stage4")]
        note = f" (stream 0 is the run's own stage 4, `{reused[0]['reused_stage4']}`)" if reused else ""
        lines.append(f"- {v}{note}: `{command} --variant {v}`")
    lines.append("")
    return lines


def figure(table: dict[str, Any], path: Path) -> None:
    """Grouped bars: each slice's accuracy per variant, error bars one between-stream standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_variant(table)
    variants = [v for v in VARIANTS if v in by]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        sums = [variant_summary(by[v], k) for k, _ in SLICES]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(SLICES))]
        ys = [100 * s["mean"] if s else 0.0 for s in sums]
        err = [100 * (s["stream_se"] or 0.0) if s else 0.0 for s in sums]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"{v} ({by[v][0]['visual_tokens_per_image']} tok/img)")
    ax.set_xticks(range(len(SLICES)), [lab for _, lab in SLICES], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("visual-token granularity at the full stage-4 budget (test split)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- first-answer latency per variant (from a `maven-edge bench` run) -------------------------------
TTFT_MODES = ("hybrid", "discrete", "continuous")  # what the runtime runs; continuous-grid is composed


def ttft_from_bench(results_path: Path, pipeline: str = "ort") -> dict[str, Any]:
    """Median TTFT per variant and image count from a bench run's `results.json` (its `pipeline`
    section, modes hybrid, discrete and continuous). continuous-grid is not a runtime mode (the
    ablation's fixed subset exists in training and evaluation only), so its figure is *composed*
    from stages measured in the same run: continuous's preprocess, vision, projection and assembly,
    plus hybrid's prefill, whose prompt has exactly the grid variant's length."""
    if not results_path.is_file():
        raise TrainingError(f"--bench: {results_path} is not a bench results.json; run `maven-edge bench --sections "
                            "pipeline --modes hybrid,discrete,continuous --out DIR` and pass DIR")
    res = json.loads(results_path.read_text())
    cells = res.get("pipeline", {}).get(pipeline, {}).get("cells", [])
    got: dict[str, dict[int, dict[str, Any]]] = {}
    for c in cells:
        if c.get("status") == "measured" and c["mode"] in TTFT_MODES:
            got.setdefault(c["mode"], {})[int(c["images"])] = c
    missing = [m for m in TTFT_MODES if m not in got]
    if missing:
        raise TrainingError(f"--bench: {results_path} has no measured {pipeline} pipeline cells for mode(s) "
                            f"{', '.join(missing)}; bench with --sections pipeline --modes hybrid,discrete,continuous")

    def med(c: dict[str, Any], stage: str) -> float:
        return float(c["stats"][f"{stage}_ms"]["median"])

    rows: dict[str, dict[str, Any]] = {}
    for m in TTFT_MODES:
        rows[m] = {str(n): {"ttft_ms": med(c, "ttft"), "prompt_tokens": c["prompt_tokens"],
                            "visual_tokens_per_image": c["visual_tokens_per_image"]} for n, c in sorted(got[m].items())}
    grid = {}
    for n, c in sorted(got["continuous"].items()):
        h = got["hybrid"].get(n)
        if h is None:
            continue
        grid[str(n)] = {"ttft_ms": sum(med(c, s) for s in ("preprocess", "vision", "selector", "assemble"))
                        + med(h, "prefill"), "prompt_tokens": h["prompt_tokens"],
                        "visual_tokens_per_image": h["visual_tokens_per_image"], "composed": True}
    rows["continuous-grid"] = grid
    opts = res.get("options", {})
    return {"source": str(results_path), "preset": opts.get("preset"), "threads": opts.get("threads"),
            "pipeline": pipeline, "cpu": res.get("machine", {}).get("cpu"), "rows": rows}


def render_ttft(t: dict[str, Any]) -> list[str]:
    counts = sorted({int(n) for r in t["rows"].values() for n in r})
    lines = [f"First answer per variant on `{t['preset']}` geometry ({t['pipeline']} backend, {t['threads']} threads, "
             f"{t['cpu']}; median TTFT in ms, visual tokens per image in brackets; from `{t['source']}`):", "",
             "| variant | " + " | ".join(f"{n} image{'s' if n > 1 else ''}" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for v in VARIANTS:
        r = t["rows"].get(v, {})
        cells = []
        for n in counts:
            c = r.get(str(n))
            cells.append("–" if c is None else f"{c['ttft_ms']:.0f} ({c['visual_tokens_per_image']})"
                         + (" ᶜ" if c.get("composed") else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "ᶜ composed from stages measured in the same run (continuous's vision and projection, hybrid's "
              "prefill of a prompt of the same length): the fixed-subset variant is an ablation, not a runtime mode.",
              ""]
    return lines

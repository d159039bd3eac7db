"""The paper's analyses on our model, each re-creatable by one command:

    maven-edge ablations --only table4 --run artifacts/runs/R36F --out docs     # hours: trains 8 stage 4s
    maven-edge ablations --only keep --only selector --only codes --out docs   # minutes, shipped model

* ``table4``   Table-4 analogue at the full budget (table4.py): from one run's stage-3 weights, the
               recipe's stage-4 `4-instruct` phase once per visual encoding (hybrid, discrete-only, continuous-only,
               continuous with hybrid's token count) and sample stream, each evaluated in its own mode.
* ``keep``     Figure-4 analogue: keep-ratio sweep (0.1, 0.25, 0.5, 1.0) of the checkpoint:
               exact match per family and visual tokens per image.
* ``selector`` Figure-5 analogue: kept patches over the image next to the selector's score map.
* ``codes``    discrete-code visualisation: for a few frequent codes, the images that contain them.
* ``sources``  where a hybrid checkpoint's answers come from: the test split with its own visual
               tokens, with each image's codes or kept patches swapped for another image's, and with
               the selector's choice replaced by an evenly spread grid of as many patches.
* ``tokenizer`` which stage 0-vq objective makes the discrete codes describe an image (code_objectives.py):
               fresh tokenizers trained on the checkpoint's frozen ViT, each probed for content.

Results go to ``OUT/ablations.md`` (tables), ``OUT/ablations.json`` and ``OUT/figures/*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maven_edge.core.errors import TrainingError
from maven_edge.core.paths import shown_path
from maven_edge.model_src.checkpoint import SHIPPED_TINY, load_checkpoint
from maven_edge.model_src.data.splits import iter_samples
from maven_edge.model_src.train import batches as B
from maven_edge.model_src.train import table4 as T4
from maven_edge.model_src.train.common import set_threads, visual_features
from maven_edge.model_src.train.evaluate import evaluate

KEEP_RATIOS = (0.1, 0.25, 0.5, 1.0)
ANALYSES = ("table4", "keep", "selector", "codes", "sources", "tokenizer", "ttft")
#: the probes of ``sources``: how the visual features are changed before they are embedded
SOURCE_PROBES: dict[str, str] = {
    "own": "each image's own codes and kept patches",
    "other_codes": "codes of another image (own patches, selected from own codes)",
    "other_patches": "kept patches of another image (own codes)",
    "grid_patches": "own codes; an evenly spread grid of as many patches instead of the selector's",
}
SOURCE_SLICES = ("single", "multi", "multi 5-8", "caption", "video", "overall")
CONTENT_STEPS = 300  # training steps of each code-content probe head (diagnose.code_content)
CONTENT_HELD_OUT = 256  # validation images each code-content head is scored on


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fam_row(r: dict[str, Any]) -> str:
    f = r["family_accuracy"]
    return " | ".join(f"{100 * f.get(k, float('nan')):.1f}" for k in ("single", "multi", "caption")) + (
        f" | {100 * r['accuracy']:.1f}"
    )


def keep_ratio_sweep(model, figures: Path, limit: int | None, quiet: bool) -> dict[str, Any]:
    rows = []
    for r in KEEP_RATIOS:
        rep = evaluate(model, "test", "hybrid", keep_ratio=r, limit=limit, quiet=quiet)
        rows.append({"keep_ratio": r, "visual_tokens_per_image": rep["visual_tokens_per_image"],
                     "accuracy": rep["accuracy"], "family_accuracy": rep["family_accuracy"],
                     "mean_prefill_tokens": rep["mean_prefill_tokens"]})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for fam in ("single", "multi", "caption"):
        ax.plot([r["keep_ratio"] for r in rows], [100 * r["family_accuracy"][fam] for r in rows], "o-", label=fam)
    ax.plot([r["keep_ratio"] for r in rows], [100 * r["accuracy"] for r in rows], "k--", label="overall")
    for r in rows:
        ax.annotate(f"{r['visual_tokens_per_image']} tok", (r["keep_ratio"], 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=7)
    ax.set_xlabel("keep ratio (kept patches / 64)")
    ax.set_ylabel("exact match (%)")
    ax.set_xscale("log")
    ax.set_xticks(list(KEEP_RATIOS), [str(k) for k in KEEP_RATIOS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("keep-ratio sweep (hybrid, test split)")
    fig.tight_layout()
    fig.savefig(figures / "keep_ratio_sweep.png", dpi=110)
    plt.close(fig)
    return {"rows": rows}


@torch.no_grad()
def selector_figure(model, figures: Path, n: int = 4) -> dict[str, Any]:
    samples = list(iter_samples("test", n * 3, families=["single"]))[:n]
    plt = _plt()
    g = model.config.vision.grid_size
    p = model.config.vision.patch_size
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n))
    out = []
    for row, s in enumerate(samples):
        px = B.pixel_tensor([s], model.config)
        vf = visual_features(model, px, "hybrid")
        scores = torch.sigmoid(vf.logits[0]).view(g, g).numpy()
        kept = vf.indices[0].tolist()
        img = np.asarray(s.images[0])
        ax0, ax1, ax2 = axes[row]
        ax0.imshow(img)
        ax0.set_title(s.prompt.split("Question: ")[-1].split("\n")[0][:38], fontsize=7)
        ax1.imshow(img)
        for k in kept:
            r, c = divmod(k, g)
            ax1.add_patch(plt.Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, ec="black", lw=1.2))
        ax1.set_title(f"kept {len(kept)} of {g * g} patches", fontsize=7)
        im = ax2.imshow(scores, cmap="viridis", vmin=0, vmax=1)
        ax2.set_title("selector score", fontsize=7)
        fig.colorbar(im, ax=ax2, fraction=0.046)
        for ax in (ax0, ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])
        lab = s.patch_labels[0]
        hit = sum(lab[k] for k in kept)
        out.append({"prompt": s.prompt, "kept": kept, "precision": float(hit / len(kept)),
                    "recall": float(hit / max(1, lab.sum()))})
    fig.tight_layout()
    fig.savefig(figures / "selector_patches.png", dpi=110)
    plt.close(fig)
    return {"examples": out}


@torch.no_grad()
def code_figure(model, figures: Path, n_images: int = 400, n_codes: int = 6, per_code: int = 6) -> dict[str, Any]:
    samples = list(iter_samples("val", n_images, families=["caption", "single"]))
    px = B.pixel_tensor(samples, model.config)
    codes = (model.discrete(model.vision(px)) - model.config.visual_offset).numpy()
    counts = np.bincount(codes.ravel(), minlength=model.config.discrete.codebook_size)
    # codes that occur in some images but not all: the informative ones
    present = np.array([(codes == c).any(1).sum() for c in range(len(counts))])
    cand = [c for c in np.argsort(-present) if 0 < present[c] < 0.5 * len(samples)][:n_codes]
    plt = _plt()
    fig, axes = plt.subplots(len(cand), per_code, figsize=(1.3 * per_code, 1.4 * max(1, len(cand))), squeeze=False)
    out = []
    for row, c in enumerate(cand):
        imgs = [i for i in range(len(samples)) if (codes[i] == c).any()][:per_code]
        captions = [samples[i].answer if samples[i].task == "caption" else "" for i in imgs]
        for col in range(per_code):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(imgs):
                ax.imshow(np.asarray(samples[imgs[col]].images[0]))
            if col == 0:
                ax.set_ylabel(f"code {c}\n{present[c]} imgs", fontsize=7)
        out.append({"code": int(c), "images_with_code": int(present[c]), "examples": captions})
    fig.suptitle("images whose discrete tokens include a code", fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "discrete_codes.png", dpi=110)
    plt.close(fig)
    p = counts / counts.sum()
    return {"codes": out, "codebook_usage": float((counts > 0).mean()),
            "code_perplexity": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), "images": len(samples)}


def answer_sources(model, checkpoint: Path, limit: int | None, quiet: bool) -> dict[str, Any]:
    """Accuracy of a hybrid checkpoint on the test split under each of :data:`SOURCE_PROBES`
    (diagnose.py's hooks: another image is the previous one in the evaluation batch), with each
    question's correctness so the changes are paired over the same questions; and what its
    discrete codes can carry about an image's content (diagnose.code_content)."""
    from maven_edge.core.manifest import sha256_file
    from maven_edge.model_src.train.diagnose import code_content, grid_selection, roll_codes, roll_patches

    hooks = {"own": None, "other_codes": roll_codes, "other_patches": roll_patches, "grid_patches": grid_selection}
    probes: dict[str, Any] = {}
    questions: dict[str, list[Any]] = {}
    for name in SOURCE_PROBES:
        rep = evaluate(model, "test", "hybrid", limit=limit, quiet=quiet, features_hook=hooks[name],
                       return_predictions=True)
        preds = rep.pop("predictions")
        questions = {"families": [r["family"] for r in preds], "images": [r["images"] for r in preds],
                     "tasks": [r["task"] for r in preds]}
        probes[name] = {"accuracy": rep["accuracy"], "family_accuracy": rep["family_accuracy"],
                        "task_accuracy": rep["task_accuracy"], "image_bucket_accuracy": rep["image_bucket_accuracy"],
                        "correct": "".join("1" if r["correct"] else "0" for r in preds)}
    weights = checkpoint / "model.safetensors"
    return {"checkpoint": str(checkpoint), "weights_sha256": sha256_file(weights) if weights.is_file() else None,
            "num_questions": len(questions["families"]),
            "questions": {k: ",".join(map(str, v)) for k, v in questions.items()}, "probes": probes,
            "code_content": code_content(model, steps=CONTENT_STEPS, held_out=CONTENT_HELD_OUT)}


def render_sources(src: dict[str, Any]) -> list[str]:
    """The ``sources`` section: accuracy per probe, and each probe minus own, paired per question."""
    probes, q = src["probes"], src["questions"]
    fam, img = q["families"].split(","), [int(x) for x in q["images"].split(",")]
    lines = ["## Where a hybrid model's answers come from", "",
             f"Checkpoint `{src['checkpoint']}` (weights sha256 `{(src.get('weights_sha256') or '?')[:12]}…`), "
             f"{src['num_questions']} test questions, hybrid mode; each probe changes the visual features before "
             "they are embedded (another image = the previous image in the evaluation batch). Re-create with "
             f"`maven-edge ablations --only sources --checkpoint {src['checkpoint']} --out docs`.", "",
             "| probe | what the decoder sees | " + " | ".join(SOURCE_SLICES) + " |",
             "|---|---|" + "---|" * len(SOURCE_SLICES)]
    for name, what in SOURCE_PROBES.items():
        r = probes[name]
        cells = [T4.slice_of(r, k) for k in SOURCE_SLICES]
        lines.append(f"| {name} | {what} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    lines += ["", "Each probe minus own (points, paired over the same questions, ± one standard error; *drops* beyond "
              "two standard errors):", "", "| probe | " + " | ".join(SOURCE_SLICES) + " |",
              "|---|" + "---|" * len(SOURCE_SLICES)]
    own = [probes["own"]]
    words = []
    for name in SOURCE_PROBES:
        if name == "own":
            continue
        cells = []
        for k in SOURCE_SLICES:
            c = T4.compare([probes[name]], own, fam, img, k)
            if c is None:
                cells.append("–")
                continue
            v = T4.verdict(c)
            tag = {"behind": "drops", "ahead": "rises", "tied": "no change"}[v]
            cells.append(f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} ({tag})")
            if k == "overall":
                words.append(f"{name} {100 * c['diff']:+.1f} points overall ({tag})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = sorted(probes["own"]["task_accuracy"])
    lines += ["", "Per task (%):", "", "| probe | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name in SOURCE_PROBES:
        lines.append(f"| {name} | " + " | ".join(f"{100 * probes[name]['task_accuracy'][t]:.1f}" for t in tasks) + " |")
    lines += ["", "In plain words: " + "; ".join(words) + ".", ""]
    if "code_content" in src:
        lines += _render_code_content(src["code_content"])
    return lines


def _render_code_content(c: dict[str, Any]) -> list[str]:
    from maven_edge.model_src.train.diagnose import CONTENT_INPUTS

    base = c["pair_bce_base_rate"]
    pooled = ("max-pooled over the input's vectors, a presence detector" if c.get("pool", "mean") == "max"
              else "mean-pooled over the input's vectors, as in stage 0-vq")
    lines = ["What the discrete codes can carry: a fresh scene-summary head (stage 0-vq's training-only head: "
             f"which of the 30 colour-shape pairs an image holds, how many objects; {pooled}) trained "
             f"{c['steps']} steps (batch {c['batch']}) on each frozen input of single-image train questions, "
             f"scored on {c['held_out_images']} validation images ({c['pairs_per_image']:.2f} pairs per image; "
             f"predicting each pair's frequency whatever the image gives a pair loss of {base:.3f}):", "",
             "| input | pair loss (base rate " + f"{base:.3f}) | pair F1 | object count right |", "|---|---|---|---|"]
    for kind, what in CONTENT_INPUTS:
        r = c["inputs"][kind]
        lines.append(f"| {what} | {r['pair_bce']:.3f} | {r['pair_f1']:.2f} | {100 * r['count_accuracy']:.1f} % |")
    lines.append("")
    return lines


def run_ablations(checkpoint: str | None, run: str | None, out: str, only: list[str], steps_scale: float | None,
                  limit: int | None, quiet: bool, streams: int = T4.DEFAULT_STREAMS,
                  variants: list[str] | None = None, bench: str | None = None) -> dict[str, Any]:
    set_threads()
    todo = only or [a for a in ANALYSES if a != "ttft" or bench is not None]
    if "ttft" in todo and bench is None:
        raise TrainingError("ttft reads a bench run: pass --bench DIR (a `maven-edge bench --sections pipeline "
                            "--modes hybrid,discrete,continuous` output)")
    bad = [a for a in todo if a not in ANALYSES]
    if bad:
        raise TrainingError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)}")
    if "table4" in todo and run is None:  # before the other analyses' minutes of work
        raise TrainingError("table4 needs --run DIR (a training run directory; stages 0-3 are trained there "
                            "first if it has no stage3/)")
    T4.check_variants(variants or ())
    out_dir = Path(out)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "ablations.json"
    ckpt = Path(checkpoint) if checkpoint else SHIPPED_TINY
    model = (load_checkpoint(ckpt) if any(a in ("keep", "selector", "codes", "sources", "tokenizer") for a in todo)
             else None)
    fresh: dict[str, Any] = {}
    if "keep" in todo:
        fresh["keep"] = keep_ratio_sweep(model, figures, limit, quiet)
    if "selector" in todo:
        fresh["selector"] = selector_figure(model, figures)
    if "codes" in todo:
        fresh["codes"] = code_figure(model, figures)
    if "sources" in todo:
        fresh["sources"] = answer_sources(model, ckpt, limit, quiet)
    if "tokenizer" in todo:
        from maven_edge.model_src.train.code_objectives import tokenizer_objectives

        fresh["tokenizer"] = tokenizer_objectives(model, shown_path(ckpt), steps_scale or 1.0, CONTENT_STEPS,
                                                  CONTENT_HELD_OUT, quiet)
    def save(sections: dict[str, Any]) -> dict[str, Any]:
        # merge into the file as it is now, not as it was at the start: a long table4 run must not
        # overwrite sections another `maven-edge ablations --only ...` wrote meanwhile
        results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results.update(sections)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        (out_dir / "ablations.md").write_text(render_markdown(results))
        if "table4" in sections and sections["table4"].get("rows"):
            T4.figure(sections["table4"], figures / "table4_full.png")
        return results

    if "ttft" in todo:
        fresh["ttft"] = T4.ttft_from_bench(Path(bench) / "results.json")
    if "table4" in todo:  # long: the report is rewritten after every finished (variant, stream)
        reported = json.loads(results_path.read_text()).get("table4") if results_path.is_file() else None
        fresh["table4"] = T4.table4_full(Path(run), steps_scale or 1.0, streams, limit, quiet,
                                         tuple(variants or T4.VARIANTS),
                                         on_row=lambda t: save({**fresh, "table4": T4.compact(t)}),
                                         reported=reported)
        fresh["table4"] = T4.compact(fresh["table4"])
    return save(fresh)



def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Ablations", "",
             "Generated by `maven-edge ablations` (see `model_src/train/ablations.py` and `table4.py`); numbers are",
             "exact-match accuracy (%) on the test split unless stated. The keep-ratio, selector and code sections",
             "describe the shipped tiny model and re-create with",
             "",
             "    maven-edge ablations --only keep --only selector --only codes --out docs",
             ""]
    t4 = results.get("table4")
    if t4 is not None and "streams" in t4:
        command = f"maven-edge ablations --only table4 --run {t4['run']} --streams {t4['streams']} --out docs"
        lines += T4.render(t4, command)
        if t4.get("rows"):
            lines += ["![table 4 at the full budget](figures/table4_full.png)", ""]
    if "ttft" in results:
        lines += T4.render_ttft(results["ttft"])
    if "keep" in results:
        lines += ["## Figure 4 analogue: keep-ratio sweep", "", "![keep-ratio sweep](figures/keep_ratio_sweep.png)",
                  "", "| keep ratio | visual tokens / image | mean prefill tokens | single | multi | caption | overall |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["keep"]["rows"]:
            lines.append(f"| {r['keep_ratio']} | {r['visual_tokens_per_image']} | {r['mean_prefill_tokens']:.1f} | "
                         f"{_fam_row(r)} |")
        lines.append("")
    if "selector" in results:
        lines += ["## Figure 5 analogue: selected patches and selector scores", "",
                  "![selector](figures/selector_patches.png)", "",
                  "Left: the test image and question; middle: the kept patches (top-k of the selector logits,",
                  "black boxes); right: the selector's sigmoid score per patch. Precision / recall of the kept",
                  "patches against the question's pseudo-label mask:", ""]
        for e in results["selector"]["examples"]:
            q = e["prompt"].split("\n")[1]
            lines.append(f"- `{q}`: precision {e['precision']:.2f}, recall {e['recall']:.2f}")
        lines.append("")
    if "codes" in results:
        c = results["codes"]
        lines += ["## Discrete codes", "", "![codes](figures/discrete_codes.png)", "",
                  f"Over {c['images']} validation images the tokenizer uses {100 * c['codebook_usage']:.0f}% of the "
                  f"codebook (code perplexity {c['code_perplexity']:.1f}). Each row shows images whose 32 codes "
                  "include that code.", ""]
    if "sources" in results:
        lines += render_sources(results["sources"])
    if "tokenizer" in results:
        from maven_edge.model_src.train.code_objectives import render_tokenizer

        lines += render_tokenizer(results["tokenizer"])
    short = results.get("table4_short") or (t4 if t4 is not None and "streams" not in t4 else None)
    if short is not None:  # the superseded short-budget table goes last
        lines += _short_table4(short)
    return "\n".join(lines) + "\n"


def _short_table4(t: dict[str, Any]) -> list[str]:
    """The first Table-4 analogue (a tenth of stage 4 per variant): kept as a labelled appendix."""
    lines = ["## Appendix: the short-budget Table 4 (superseded)", "",
             f"Each variant started from the same stage-3 weights and ran stage 4 for {t['steps']} steps "
             f"({t['steps_scale']:.2f} of the recipe's stage-4 budget), then was evaluated in its own mode."
             + (f" Attention targets' role heads in decoder layer(s) {', '.join(map(str, t['role_layers']))}."
                if "role_layers" in t else "")
             + " At this budget nothing much has been learnt yet, so it does not test the paper's claim; the "
             "full-budget table above does.", "",
             "| variant | visual tokens / image | single | multi | caption | overall |",
             "|---|---|---|---|---|---|"]
    for mode, r in t["rows"].items():
        lines.append(f"| {mode} | {r['visual_tokens_per_image']} | {_fam_row(r)} |")
    rows = t["rows"]
    modes = ("hybrid", "discrete", "continuous")
    if all(m in rows and "multi" in rows[m]["family_accuracy"] for m in modes):  # --limit may ask none
        h = rows["hybrid"]["family_accuracy"]["multi"]
        others = {m: rows[m]["family_accuracy"]["multi"] for m in ("discrete", "continuous")}
        best = max(others, key=others.get)
        verdict = ("beats both single-granularity variants" if h > max(others.values())
                   else f"does **not** beat the {best}-only variant")
        n = rows["hybrid"].get("family_counts", {}).get("multi")
        margin = 100 * (h - others[best])
        if n:  # two standard errors of a difference of two accuracies near h on n questions
            noise = 100 * 2 * (2 * h * (1 - h) / n) ** 0.5
            judged = (f"The margin to the best single-granularity variant is {margin:+.1f} points; two standard "
                      f"errors of such a difference on {n} multi-image questions are about {noise:.1f} points, so "
                      + ("the difference is larger than the sampling noise." if abs(margin) > noise else
                         "the difference is within the sampling noise: this run neither confirms nor refutes "
                         "the paper's Table 4 on multi-image questions."))
        else:
            judged = f"The margin to the best single-granularity variant is {margin:+.1f} points."
        lines += ["", f"On multi-image questions hybrid ({100 * h:.1f} %) {verdict} "
                  f"(discrete {100 * others['discrete']:.1f} %, continuous {100 * others['continuous']:.1f} %). "
                  f"{judged} Visual tokens per image: hybrid {rows['hybrid']['visual_tokens_per_image']}, "
                  f"continuous {rows['continuous']['visual_tokens_per_image']}, "
                  f"discrete {rows['discrete']['visual_tokens_per_image']}."]
    lines.append("")
    return lines

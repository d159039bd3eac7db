"""Which stage 0-vq objective gives discrete codes that describe an image's content.

The Table-4 analogue ties hybrid with the continuous rows because the shipped tokenizer's codes
carry how many objects an image holds and nothing about which (docs/ablations.md, "Where a hybrid
model's answers come from"). This analysis retrains only the tokenizer, from a fresh initialisation,
with the recipe's stage 0-vq (same steps, batches, schedule, codebook restarts) on a checkpoint's
frozen ViT, once per variant of :data:`TOKENIZER_VARIANTS`, and probes each result with
`diagnose.code_content` (a fresh max-pooled scene head on the frozen ViT features, query outputs
and quantized codes). A variant whose codes carry the colour-shape pairs is what a fair rerun of
the whole table needs (stages 1-4 on top of it: hours, `maven-edge ablations --only table4`).

    maven-edge ablations --only tokenizer --out docs      # ~20 minutes on two threads
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maven_edge.model_src.modeling.discrete import DiscreteTokenizer
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.train.diagnose import code_content
from maven_edge.model_src.train.loop import read_jsonl, run_phase
from maven_edge.model_src.train.recipe import REGION_TARGETS, get_recipe
from maven_edge.model_src.train.stages import phase_vq


@dataclass(frozen=True)
class TokenizerVariant:
    pooling: str  # DiscreteConfig.pooling
    region_targets: float  # PhaseConfig.region_targets of stage 0-vq
    help: str


TOKENIZER_VARIANTS: dict[str, TokenizerVariant] = {
    "queries": TokenizerVariant("queries", 0.0, "learned queries (Q-Former, the paper's and the shipped design), "
                                "the recipe's 0-vq objective"),
    "regions": TokenizerVariant("regions", 0.0, "each query starts from its region's patches, the recipe's 0-vq "
                                "objective"),
    "regions+targets(1)": TokenizerVariant("regions", 1.0, "each query starts from its region's patches; 0-vq "
                                           "also predicts each region's objects (colour, shape, size, centre) "
                                           "from its code, weight 1"),
    f"regions+targets({REGION_TARGETS:g})": TokenizerVariant(
        "regions", REGION_TARGETS, f"the same with weight {REGION_TARGETS:g} (the recipe's for a regions model)"),
}


def retrain_tokenizer(model: MavenModel, variant: TokenizerVariant, steps_scale: float = 1.0, seed: int = 0,
                      quiet: bool = True) -> tuple[MavenModel, dict[str, Any]]:
    """A new model with `model`'s weights except its tokenizer, which is freshly initialised with
    `variant`'s pooling and trained by stage 0-vq (the recipe's config, `steps_scale` of its steps,
    `variant`'s region targets) on the model's frozen ViT; with the phase's wall time and last log."""
    cfg = dataclasses.replace(model.config, discrete=dataclasses.replace(model.config.discrete,
                                                                         pooling=variant.pooling)).validate()
    fresh = copy.deepcopy(model)
    fresh.config = cfg
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh.discrete = DiscreteTokenizer(cfg.discrete, cfg.vision.hidden_size, cfg.visual_offset,
                                           cfg.vision.grid_size)
    phase_cfg = dataclasses.replace(get_recipe(cfg.name or "tiny", steps_scale)["0-vq"],
                                    region_targets=variant.region_targets)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maven-vq-") as tmp:
        summary = run_phase(phase_vq(fresh, phase_cfg, seed), Path(tmp) / "0-vq", resume=False, quiet=quiet)
        last = read_jsonl(Path(tmp) / "0-vq" / "log.jsonl")[-1]
    return fresh.eval(), {"steps": phase_cfg.steps, "train_time_s": round(time.perf_counter() - t0, 1),
                         "last_log": last, "val_code_perplexity": summary.get("val_code_perplexity")}


def tokenizer_objectives(model: MavenModel, checkpoint: str, steps_scale: float = 1.0, probe_steps: int = 300,
                         held_out: int = 256, quiet: bool = True) -> dict[str, Any]:
    """The checkpoint's own tokenizer and each retrained variant, probed by `code_content`."""
    own = code_content(model, steps=probe_steps, held_out=held_out)
    out: dict[str, Any] = {"checkpoint": checkpoint, "steps_scale": steps_scale, "probe": {
        k: own[k] for k in ("steps", "batch", "held_out_images", "pool", "pair_bce_base_rate", "pairs_per_image")},
        "vit": own["inputs"]["vit"], "rows": {"checkpoint": {"inputs": {k: own["inputs"][k] for k in ("z", "codes")}}}}
    for name, variant in TOKENIZER_VARIANTS.items():
        trained, summary = retrain_tokenizer(model, variant, steps_scale, quiet=quiet)
        probed = code_content(trained, steps=probe_steps, held_out=held_out, kinds=("z", "codes"))
        out["rows"][name] = {"inputs": probed["inputs"], **summary}
    return out


def render_tokenizer(res: dict[str, Any]) -> list[str]:
    """The ``tokenizer`` section of docs/ablations.md."""
    p = res["probe"]
    lines = ["## Which tokenizer objective makes codes describe the image", "",
             f"Each variant's tokenizer is freshly initialised and trained by the recipe's stage 0-vq "
             f"({res['rows'][next(iter(TOKENIZER_VARIANTS))]['steps']} steps) on the frozen ViT of `{res['checkpoint']}`; "
             f"then a fresh scene head (max-pooled, {p['steps']} steps, batch {p['batch']}) is trained on its frozen "
             f"outputs and scored on {p['held_out_images']} validation images ({p['pairs_per_image']:.2f} "
             f"colour-shape pairs per image; base-rate pair loss {p['pair_bce_base_rate']:.3f}; the ViT features "
             f"themselves: {res['vit']['pair_bce']:.3f}, F1 {res['vit']['pair_f1']:.2f}). Re-create with "
             "`maven-edge ablations --only tokenizer --out docs`.", "",
             "| tokenizer | what it is | 0-vq time | query outputs: pair loss / F1 | codes: pair loss / F1 | "
             "codes: object count right |", "|---|---|---|---|---|---|"]
    helps = {"checkpoint": "the checkpoint's own tokenizer, as shipped", **{k: v.help for k, v in TOKENIZER_VARIANTS.items()}}
    for name, row in res["rows"].items():
        z, c = row["inputs"]["z"], row["inputs"]["codes"]
        t = f"{row['train_time_s'] / 60:.1f} min" if "train_time_s" in row else "–"
        lines.append(f"| {name} | {helps.get(name, '')} | {t} | {z['pair_bce']:.3f} / {z['pair_f1']:.2f} | "
                     f"{c['pair_bce']:.3f} / {c['pair_f1']:.2f} | {100 * c['count_accuracy']:.1f} % |")
    lines.append("")
    return lines

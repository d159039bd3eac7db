"""Stage configurations of the training recipe (torch-free).

Stage 0 has three phases (vision, vq, text) that run one after the other; stages 1-4 have one.
`--steps-scale F` multiplies every phase's step count (at least 2 steps each), which is how the
tests run the whole recipe in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from maven_edge.core.errors import TrainingError
from maven_edge.model_src.data.tasks import TASK_FAMILY, TASKS

STAGES = ("0", "1", "2", "3", "4")
GRAY_LEVELS = ("luma", "random")  # PhaseConfig.gray_levels


@dataclass
class PhaseConfig:
    """One optimisation run: steps, batch size (samples or images), AdamW and schedule knobs."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 50
    max_tokens_per_micro: int = 2400  # micro-batch token budget (sorted by length, less padding)
    mode: str = "hybrid"  # visual encoding mode for the LLM stages
    families: tuple[str, ...] = ()  # data families (empty: every family)
    followups: int = 0  # extra questions about the same images per sample (multi-turn; LLM stages)
    # with followups: a `changed` sample's first follow-up is its edit asked backwards (followups.py)
    reverse_change: bool = False
    gray_share: float = 0.0  # 0-vision: share of images shown in grey scale (no colour target)
    gray_levels: str = "luma"  # 0-vision grey images: "luma" (each pixel's luminance) or "random" (per object)
    # 0-vision, > 0: every image also gets a grey copy; shape is learnt from the grey copies only and
    # each colour image's shape prediction is pulled (KL, this weight) to its copy's (gray_share:
    # the share of samples shown as the grey copy only)
    gray_consistency: float = 0.0
    image_slots: bool = False  # turn on the model's image-slot vectors (zero-initialised) for this phase
    attention_targets: float = 0.0  # LLM stages: weight of the attention-target loss (attention_targets.py)
    count_head: bool = False  # with attention_targets: also supervise a counting head (attention_targets.py)
    seed_offset: int = 0  # added to the run's --seed for this phase (its batches, follow-ups, head inits)
    # (task, weight) pairs: draw the primary task of each sample with these relative weights (tasks
    # not named: 1); empty: uniform over the tasks of `families`, the stream every earlier run used
    task_weights: tuple[tuple[str, float], ...] = ()
    # continuous mode, > 0: every image shows the same evenly spread subset of this many patches
    # (common.grid_patches) instead of all of them: the ablation's "equal visual tokens" row
    patch_subset: int = 0
    # 0-vq, > 0: weight of per-region object targets (colour, shape, size and centre of each patch,
    # predicted from its region's code; needs discrete.pooling "regions"): codes that describe
    # their region's objects, not only the scene's object count (docs/training.md, "Ablations")
    region_targets: float = 0.0
    # LLM stages: a count across images (its own question and follow-ups) is answered as a running
    # tally, "2+0=2+1=3" (data.tasks.count_chain; scored by its result), with per-term attention
    # targets (attention_targets.py): one small addition per image instead of one sum at once
    worked_counts: bool = False
    # with worked_counts: each term of the tally names its image as the prompt labels it,
    # "1:2+ 2:0=2+ 3:1=3", so the position writing image k's count can find image k by its label
    # (the same "k:" tokens as the prompt's "Image k:") instead of by counting the "+" before it
    labelled_tally: bool = False
    # with followups: multi-image samples also draw per-image count follow-ups ("how many red shapes
    # are there in image 3?", data.followups' count_in_image): the skill of one tally term, asked
    # on its own, with role targets on image k's counted objects (all of image k for a 0)
    image_count_followups: bool = False
    # with worked_counts, > 1: each term of a tally (the per-image count, "2" in "1:2+") weighs this
    # many times an ordinary answer token in its sample's mean answer loss; 1: every answer token
    # alike (an 8-image tally's 8 terms are 8 of its 52 answer tokens, the rest follow from them)
    term_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.gray_levels not in GRAY_LEVELS:
            raise TrainingError(f"gray_levels must be one of {GRAY_LEVELS}, got {self.gray_levels!r}")
        if self.patch_subset < 0 or (self.patch_subset and self.mode != "continuous"):
            raise TrainingError(f"patch_subset needs mode continuous and a count >= 1 (0: all patches), got "
                                f"{self.patch_subset} with mode {self.mode!r}")
        if not self.region_targets >= 0:
            raise TrainingError(f"region_targets must be >= 0, got {self.region_targets}")
        if self.labelled_tally and not self.worked_counts:
            raise TrainingError("labelled_tally labels the terms of a worked count: it needs worked_counts")
        if not self.term_loss_weight > 0:
            raise TrainingError(f"term_loss_weight must be > 0, got {self.term_loss_weight}")
        if self.term_loss_weight != 1.0 and not self.worked_counts:
            raise TrainingError("term_loss_weight weighs the terms of a worked count: it needs worked_counts")
        if self.image_count_followups and not self.followups:
            raise TrainingError("image_count_followups adds follow-up questions: it needs followups >= 1")
        if not self.gray_consistency >= 0:
            raise TrainingError(f"gray_consistency must be >= 0, got {self.gray_consistency}")
        self.task_weights = tuple((str(t), float(w)) for t, w in self.task_weights)
        for task, weight in self.task_weights:
            if task not in TASKS:
                raise TrainingError(f"task_weights: unknown task {task!r}; expected one of {', '.join(TASKS)}")
            if not weight > 0:
                raise TrainingError(f"task_weights: weight of {task!r} must be > 0, got {weight}")
            if self.families and TASK_FAMILY[task] not in self.families:
                raise TrainingError(
                    f"task_weights names {task!r} (family {TASK_FAMILY[task]!r}), which this phase never draws "
                    f"(families {', '.join(self.families)}); drop it or add its family"
                )

    def scaled(self, scale: float) -> PhaseConfig:
        if not scale > 0:
            raise TrainingError(f"--steps-scale must be > 0, got {scale}")
        steps = max(2, math.ceil(self.steps * scale))
        return dataclasses.replace(
            self,
            steps=steps,
            warmup=min(self.warmup, max(1, steps // 5)),
            ckpt_every=min(self.ckpt_every, max(1, steps // 2)),
            log_every=min(self.log_every, max(1, steps // 4)),
        )

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to lr * min_lr_ratio (step counts from 0)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def tiny_recipe() -> dict[str, PhaseConfig]:
    """Phase name -> config for the `tiny` preset: the shipped checkpoint's (run R36S: R36C's stages 0-3,
    R36T's 4-instruct, R36S's 4-count; docs/training.md, "Issue 36"). About 123 minutes on two threads of an
    idle 2-core machine, stage 4's 2100 + 500 steps 114 of them."""
    return {
        "0-vision": PhaseConfig(steps=1125, batch_size=32, lr=3e-3, warmup=30, gray_share=0.5,
                                gray_levels="random", gray_consistency=1.0),
        "0-vq": PhaseConfig(steps=1000, batch_size=32, lr=2e-3, warmup=20),
        "0-text": PhaseConfig(steps=200, batch_size=32, lr=2e-3, warmup=15),
        "1-selector": PhaseConfig(steps=150, batch_size=32, lr=1e-3, warmup=10, families=("caption",)),
        "2-discrete": PhaseConfig(steps=200, batch_size=32, lr=1e-3, warmup=20, mode="discrete",
                                  families=("caption",)),
        "3-projector": PhaseConfig(steps=80, batch_size=32, lr=1e-3, warmup=10, mode="hybrid",
                                   families=("caption",)),
        "4-instruct": PhaseConfig(steps=2100, batch_size=32, lr=1.5e-3, warmup=50, mode="hybrid", followups=4,
                                  attention_targets=1.0, seed_offset=1, reverse_change=True, worked_counts=True,
                                  labelled_tally=True, count_head=True, term_loss_weight=5.0),
        # a short low-learning-rate second phase on a fresh sample stream, counts across images drawn 3x
        # (docs/training.md, "Issue 36", run R36S)
        "4-count": PhaseConfig(steps=500, batch_size=32, lr=3e-4, warmup=20, mode="hybrid", followups=4,
                               attention_targets=1.0, seed_offset=2, reverse_change=True, worked_counts=True,
                               labelled_tally=True, count_head=True, term_loss_weight=5.0,
                               task_weights=(("count_across", 3.0), ("which_image", 1.5))),
    }


STAGE_PHASES = {
    "0": ("0-vision", "0-vq", "0-text"),
    "1": ("1-selector",),
    "2": ("2-discrete",),
    "3": ("3-projector",),
    "4": ("4-instruct", "4-count"),
}


def parse_stages(stage: str) -> list[str]:
    """`0`..`4` -> [that stage]; `all` -> every stage in order; anything else is a TrainingError."""
    stage = str(stage).strip()
    if stage == "all":
        return list(STAGES)
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or all")
    return [stage]


# stage 0-vq's region_targets for a model whose tokenizer has discrete.pooling "regions": of weights
# 1, 3, 10 and 30, 10 and 30 gave the codes the most content (docs/training.md, "Ablations")
REGION_TARGETS = 10.0


def for_model(recipe: dict[str, PhaseConfig], pooling: str) -> dict[str, PhaseConfig]:
    """The recipe for a model whose tokenizer pools with `pooling`: a "regions" tokenizer trains with
    per-region object targets in stage 0-vq (without them its codes carry only object counts, like
    the query tokenizer's: docs/ablations.md, "Which tokenizer objective makes codes describe the image")."""
    vq = recipe.get("0-vq")
    if pooling != "regions" or vq is None or vq.region_targets > 0:
        return recipe
    return {**recipe, "0-vq": dataclasses.replace(vq, region_targets=REGION_TARGETS)}


def get_recipe(preset: str, steps_scale: float = 1.0, max_batch: int | None = None) -> dict[str, PhaseConfig]:
    """The recipe (every preset shares the tiny schedule; only `tiny` is meant to train on a CPU),
    steps scaled by `steps_scale`, batch sizes capped at `max_batch` (smoke runs)."""
    if max_batch is not None and max_batch < 1:
        raise TrainingError(f"--max-batch must be >= 1, got {max_batch}")
    out = {}
    for name, cfg in tiny_recipe().items():
        cfg = cfg.scaled(steps_scale)
        if max_batch is not None:
            cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, max_batch))
        out[name] = cfg
    return out

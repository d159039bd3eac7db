"""Held-out-composition probe of the vision encoder (docs/training.md, "What is left").

The 0-vision phase trains a linear per-patch head beside the ViT (saved only in the phase's
``resume/state.safetensors``). This probe runs that head on test images and compares its colour
and shape accuracy on the patches of objects whose colour-shape pair never occurs in training
(``HELDOUT_PAIRS``) with the other objects' patches::

    python -m maven_edge.model_src.train.probes --checkpoint model_src/checkpoints/tiny \\
        --head artifacts/runs/tiny/stage0/0-vision/resume/state.safetensors
    python -m maven_edge.model_src.train.probes --train-vision --gray-share 0.5    # 0-vision from scratch, then probe
    python -m maven_edge.model_src.train.probes --train-vision --gray-share 0.8 --gray-levels random
    python -m maven_edge.model_src.train.probes --train-vision --gray-share 0.5 --gray-levels random --gray-consistency 1

``--train-vision`` runs the recipe's 0-vision phase on a fresh ``tiny`` model (seed 0) with the
given share of grey-scale images (their colour target dropped; ``--gray-levels random`` paints
each object its own random grey instead of its luminance), which is how the colour-independent
shape objective was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maven_edge.core.config import get_config
from maven_edge.model_src.data.splits import HELDOUT_PAIRS, iter_samples
from maven_edge.model_src.modeling.maven import MavenModel
from maven_edge.model_src.train import batches as B
from maven_edge.model_src.train.recipe import GRAY_LEVELS


@torch.no_grad()
def heldout_probe(model: MavenModel, head: nn.Linear, n: int = 400, split: str = "test") -> dict[str, Any]:
    """Colour and shape accuracy of the 0-vision head on object patches of ``n`` caption / single
    samples of ``split``: ``{"seen": {...}, "heldout": {...}}`` plus the patch counts."""
    model.eval()
    samples = list(iter_samples(split, n, families=["caption", "single"]))
    tgt = np.concatenate([B.vision_targets(s, model.config.vision.patch_size) for s in samples])
    logits = head(model.vision(B.pixel_tensor(samples, model.config)))
    chunks = B.split_dense_logits(logits, model.config.vision.grid_size)
    color, shape = (chunks[name].argmax(-1).numpy() for name in ("color", "shape"))
    heldout_ids = {(B.COLOR_IDS[c], B.SHAPE_IDS[s]) for c, s in HELDOUT_PAIRS}
    held = np.vectorize(lambda c, s: (c, s) in heldout_ids)(tgt[..., 0], tgt[..., 1])
    obj = tgt[..., 0] > 0
    out: dict[str, Any] = {"split": split, "samples": len(samples)}
    for name, mask in (("seen", obj & ~held), ("heldout", obj & held)):
        out[name] = {"patches": int(mask.sum()),
                     "color": float((color[mask] == tgt[..., 0][mask]).mean()),
                     "shape": float((shape[mask] == tgt[..., 1][mask]).mean())}
    return out


def head_from_state(path: str | Path, model: MavenModel) -> nn.Linear:
    """The 0-vision head from a phase's ``resume/state.safetensors``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    weight, bias = state["vit_head.weight"], state["vit_head.bias"]
    head = nn.Linear(model.config.vision.hidden_size, weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def train_vision(gray_share: float, out: Path, steps_scale: float = 1.0, quiet: bool = False,
                 gray_levels: str = "luma", gray_consistency: float = 0.0) -> tuple[MavenModel, nn.Linear]:
    """The recipe's 0-vision phase on a fresh tiny model with ``gray_share`` grey-scale images
    (``gray_levels``, ``gray_consistency``: see ``PhaseConfig``)."""
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.model_src.train.common import set_threads
    from maven_edge.model_src.train.loop import run_phase
    from maven_edge.model_src.train.recipe import get_recipe
    from maven_edge.model_src.train.stages import phase_vision

    set_threads()
    cfg = get_config("tiny")
    model = build_model(cfg, seed=0)
    pc = dataclasses.replace(get_recipe("tiny", steps_scale)["0-vision"], gray_share=gray_share,
                             gray_levels=gray_levels, gray_consistency=gray_consistency)
    phase = phase_vision(model, pc, seed=0)
    run_phase(phase, out, False, quiet)
    return model, phase.modules["vit_head"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint whose ViT to probe (with --head)")
    ap.add_argument("--head", help="the 0-vision phase's resume/state.safetensors (holds vit_head)")
    ap.add_argument("--train-vision", action="store_true", help="train 0-vision from scratch first")
    ap.add_argument("--gray-share", type=float, default=0.0)
    ap.add_argument("--gray-levels", choices=GRAY_LEVELS, default="luma",
                    help="grey images keep each pixel's luminance, or paint each object a random grey")
    ap.add_argument("--gray-consistency", type=float, default=0.0,
                    help="> 0: shape learnt from grey copies only, colour images pulled to them (KL weight)")
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=400)
    args = ap.parse_args(argv)
    if args.train_vision:
        with tempfile.TemporaryDirectory() as tmp:
            model, head = train_vision(args.gray_share, Path(tmp) / "0-vision", args.steps_scale,
                                       gray_levels=args.gray_levels, gray_consistency=args.gray_consistency)
    else:
        if not (args.checkpoint and args.head):
            ap.error("give --checkpoint and --head, or --train-vision")
        from maven_edge.model_src.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        head = head_from_state(args.head, model)
    report = heldout_probe(model, head, args.samples)
    report["gray_share"] = args.gray_share if args.train_vision else None
    report["gray_levels"] = args.gray_levels if args.train_vision else None
    report["gray_consistency"] = args.gray_consistency if args.train_vision else None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

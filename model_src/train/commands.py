"""CLI: `maven-edge train`, `maven-edge eval`, `maven-edge ablations` (torch imported lazily)."""

from __future__ import annotations

import argparse
import json
import sys

from maven_edge.core.cliutil import add_command
from maven_edge.model_src.train.table4 import DEFAULT_STREAMS as TABLE4_STREAMS
from maven_edge.model_src.train.table4 import VARIANTS as TABLE4_VARIANTS

#: maven_edge.model_src.train.ablations.ANALYSES (that module needs torch; `--help` must not)
ABLATIONS = ("table4", "keep", "selector", "codes", "sources", "tokenizer", "ttft")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "train", help="train the MaVEn recipe (stage 0 pretraining + stages 1-4)",
        description="Train stage 0 (ViT, VQ tokenizer, text decoder), 1 (selector), 2 (discrete path), "
        "3 (projector), 4 (instruction tuning), or all of them, on the synthetic shapes data. Writes one checkpoint "
        "per stage under --out (final/ after stage 4) and, after stage 4, the test-split accuracy. See "
        "docs/training.md. Needs PyTorch.",
        examples=["maven-edge train --preset tiny --out runs/tiny",
                  "maven-edge train --preset tiny --stage 0 --steps-scale 0.05 --max-batch 8 --out runs/smoke",
                  "maven-edge train --preset tiny --stage 4 --resume --out runs/tiny"])
    p.add_argument("--preset", default="tiny", help="model preset: tiny, edge-small or paper (default tiny)")
    p.add_argument("--stage", default="all", help="0, 1, 2, 3, 4 or all (default all)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (stageK/ per stage, final/ after stage 4)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and sampling (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, e.g. --set llm.num_layers=2 (repeatable)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="cap every batch size, for quick smoke runs (default: the recipe's sizes)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after stage 4")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start the one requested stage (1-4) from this trained checkpoint instead of the "
                   "previous stage's output in --out (e.g. stage 4 continued from the shipped model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    e = add_command(
        sub, "eval", help="exact-match accuracy of a checkpoint on a data split",
        description="Answer every question of a synthetic data split with a checkpoint (torch, greedy) and report "
        "exact-match accuracy overall, per task family and per task, plus the held-out compositions. Needs PyTorch.",
        examples=["maven-edge eval --checkpoint model_src/checkpoints/tiny",
                  "maven-edge eval --checkpoint model_src/checkpoints/tiny --split val --mode discrete --limit 200 --json",
                  "maven-edge eval --checkpoint model_src/checkpoints/tiny --limit 100 --predictions answers.jsonl"])
    e.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint directory (model.safetensors + config.json)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="data split (default test)")
    e.add_argument("--mode", default="hybrid", choices=("hybrid", "discrete", "continuous"),
                   help="visual encoding (default hybrid)")
    e.add_argument("--keep-ratio", type=float, default=None,
                   help="fraction of patches kept in hybrid mode (default: the checkpoint's keep ratio)")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N questions only (default: all)")
    e.add_argument("--visual-token-budget", type=int, default=None, metavar="N",
                   help="hybrid: each question's images share N visual tokens (codes + patches), the "
                   "selector's patches ranked across its images (default: a keep ratio per image)")
    e.add_argument("--min-patches", type=int, default=1, metavar="N",
                   help="with --visual-token-budget: patches every image keeps (default 1)")
    e.add_argument("--batch-size", type=int, default=32, metavar="N", help="questions per forward pass (default 32)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report to this file")
    e.add_argument("--predictions", default=None, metavar="FILE",
                   help="also write every question's answer as JSON lines (index, task, family, images, prompt, "
                   "answer, prediction, correct)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    a = add_command(
        sub, "ablations", help="re-create the paper's analyses on a checkpoint (docs/ tables and plots)",
        description="Re-create the paper's analyses: the Table-4 analogue at the full training budget (stage 4 "
        "retrained from one run's stage-3 weights once per visual encoding and sample stream: hybrid, discrete "
        "only, continuous only, continuous with hybrid's token count; hours on a CPU, resumable: run it again "
        "after a stop), accuracy and visual tokens against keep ratio, selector quality, what the discrete "
        "codes carry and where a hybrid checkpoint's answers come from (codes or patches swapped for another "
        "image's, the selector replaced by a grid), which stage 0-vq objective makes codes describe the image (fresh tokenizers on the checkpoint's frozen ViT). Writes ablations.md, ablations.json and figures/ into --out (table4 rewrites them after "
        "every finished run). Needs PyTorch.",
        examples=["maven-edge ablations --only keep --only codes --limit 100 --out /tmp/ablations",
                  "maven-edge ablations --only table4 --run artifacts/runs/R36F --out docs",
                  "maven-edge ablations --only sources --limit 64 --out /tmp/ablations",
                  "maven-edge ablations --only tokenizer --steps-scale 0.1 --out /tmp/ablations",
                  "maven-edge ablations --only table4 --run artifacts/runs/R36F --variant discrete --streams 1 "
                  "--out docs",
                  "maven-edge bench --preset edge-small --threads 2 --sections pipeline "
                  "--modes hybrid,discrete,continuous --images 1,4 --out artifacts/bench/variants",
                  "maven-edge ablations --only ttft --bench artifacts/bench/variants --out docs"])
    a.add_argument("--checkpoint", default=None, metavar="DIR", help="trained checkpoint (default: the shipped tiny model)")
    a.add_argument("--run", default=None, metavar="DIR",
                   help="training run directory whose stage3/ table4 starts from (stages 0-3 are trained there "
                   "first if missing); needed for table4, which the default (all) includes (default: none)")
    a.add_argument("--out", default="docs", metavar="DIR", help="where ablations.md and figures/ go (default docs)")
    a.add_argument("--only", action="append", default=[], choices=ABLATIONS,
                   help=f"run only this analysis: {', '.join(ABLATIONS)} (repeatable; default: all, "
                   "ttft only with --bench)")
    a.add_argument("--bench", default=None, metavar="DIR",
                   help="ttft: a `maven-edge bench --sections pipeline --modes hybrid,discrete,continuous` output "
                   "directory; its first-answer latency per variant goes beside the table")
    a.add_argument("--variant", action="append", default=[], choices=tuple(TABLE4_VARIANTS),
                   help="table4: train only this variant (repeatable; default: all four); rows other runs "
                   "finished stay in the table")
    a.add_argument("--streams", type=int, default=TABLE4_STREAMS, metavar="K",
                   help=f"table4: stage-4 sample streams per variant (default {TABLE4_STREAMS})")
    a.add_argument("--steps-scale", type=float, default=None,
                   help="table4: share of the recipe's stage-4 steps each variant trains; tokenizer: share of "
                   "stage 0-vq's (default 1: the full budget; smaller only for smoke tests)")
    a.add_argument("--limit", type=int, default=None, metavar="N", help="test questions per evaluation (default: all)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=_ablations)


def _train(args: argparse.Namespace) -> int:
    from maven_edge.model_src.train.stages import train

    results = train(args.preset, args.stage, args.out, args.steps_scale, args.resume, args.seed,
                    args.overrides, args.quiet, not args.no_eval, args.max_batch, args.init)
    for st, summary in results.items():
        if st == "final":
            if "accuracy" in summary:
                from maven_edge.model_src.train.evaluate import format_report

                print(format_report(summary))
            continue
        print(f"stage {st}: {summary['wall_time_s']:.0f} s; " + "; ".join(
            f"{ph['phase']} loss {ph['final_loss']:.4f}" for ph in summary["phases"] if ph["final_loss"] is not None))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from maven_edge.model_src.checkpoint import load_checkpoint
    from maven_edge.model_src.train.evaluate import evaluate, format_report, write_predictions

    model = load_checkpoint(args.checkpoint)
    report = evaluate(model, args.split, args.mode, args.keep_ratio, args.limit, args.batch_size,
                      quiet=args.quiet or args.json, visual_token_budget=args.visual_token_budget,
                      min_patches=args.min_patches, return_predictions=bool(args.predictions))
    if args.predictions:
        write_predictions(args.predictions, report.pop("predictions"))
    report["checkpoint"] = str(args.checkpoint)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return 0


def _ablations(args: argparse.Namespace) -> int:
    from maven_edge.model_src.train.ablations import run_ablations

    run_ablations(args.checkpoint, args.run, args.out, args.only, args.steps_scale, args.limit, args.quiet,
                  args.streams, args.variant or None, args.bench)
    return 0

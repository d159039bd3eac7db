"""CLI: `maven-edge train`, `maven-edge eval`, `maven-edge ablations` (torch imported lazily)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the MaVEn recipe (stage 0 pretraining + stages 1-4)",
                       description="Train stage 0 (ViT, VQ tokenizer, text decoder), 1 (selector), 2 (discrete "
                       "path), 3 (projector), 4 (instruction tuning), or all of them.")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--stage", default="all", help="0, 1, 2, 3, 4 or all (default all)")
    p.add_argument("--out", required=True, help="run directory (stageK/ per stage, final/ after stage 4)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, repeatable")
    p.add_argument("--max-batch", type=int, default=None, help="cap every batch size (quick smoke runs)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after stage 4")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start the one requested stage (1-4) from this trained checkpoint instead of the "
                   "previous stage's output in --out (e.g. stage 4 continued from the shipped model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="exact-match accuracy of a checkpoint on a data split")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    e.add_argument("--split", default="test", help="train, val or test (default test)")
    e.add_argument("--mode", default="hybrid", help="hybrid, discrete or continuous (default hybrid)")
    e.add_argument("--keep-ratio", type=float, default=None, help="fraction of patches kept (hybrid)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    e.add_argument("--visual-token-budget", type=int, default=None, metavar="N",
                   help="hybrid: each question's images share N visual tokens (codes + patches), the "
                   "selector's patches ranked across its images (default: a keep ratio per image)")
    e.add_argument("--min-patches", type=int, default=1,
                   help="with --visual-token-budget: patches every image keeps (default 1)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--out", default=None, help="also write the JSON report to this file")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval)

    a = sub.add_parser("ablations", help="re-create the paper's analyses on a checkpoint (docs/ tables and plots)")
    a.add_argument("--checkpoint", default=None, help="trained checkpoint (default: the shipped tiny model)")
    a.add_argument("--run", default=None, help="training run directory holding stage3/ (for the Table-4 analogue)")
    a.add_argument("--out", default="docs", help="where ablations.md and figures/ go (default docs)")
    a.add_argument("--only", action="append", default=[],
                   help="table4, keep, selector, codes (repeatable; default all)")
    a.add_argument("--steps-scale", type=float, default=None, help="share of the recipe's stage-4 steps each Table-4 variant trains (default 0.1: 210 steps)")
    a.add_argument("--limit", type=int, default=None, help="test questions per evaluation")
    a.add_argument("--quiet", action="store_true")
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
    from maven_edge.model_src.train.evaluate import evaluate, format_report

    model = load_checkpoint(args.checkpoint)
    report = evaluate(model, args.split, args.mode, args.keep_ratio, args.limit, args.batch_size,
                      quiet=args.quiet or args.json, visual_token_budget=args.visual_token_budget,
                      min_patches=args.min_patches)
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

    run_ablations(args.checkpoint, args.run, args.out, args.only, args.steps_scale, args.limit, args.quiet)
    return 0

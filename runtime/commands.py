"""`maven-edge generate`, `maven-edge demo` and `maven-edge inspect`.

Nothing heavy is imported at module import time: `generate --artifacts` runs with only numpy,
onnxruntime, tokenizers and Pillow installed; torch is imported only for `--checkpoint` and for
the demo's one-time export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from maven_edge.core.cliutil import add_command, positive_float
from maven_edge.core.config import H_EOS_MODES
from maven_edge.core.errors import CheckpointError, InputError, MavenError
from maven_edge.core.manifest import MANIFEST, load_manifest, sha256_file
from maven_edge.core.paths import cache_dir
from maven_edge.core.preprocess import fit_to_square, load_image
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from maven_edge.model_src.resources import samples_dir, shipped_checkpoint
from maven_edge.runtime.backends import BACKENDS
from maven_edge.runtime.backends.providers import PROVIDERS
from maven_edge.runtime.caches import DEFAULT_PREFIX_CACHE_MB, DEFAULT_VISUAL_CACHE_MB
from maven_edge.runtime.options import PipelineOptions
from maven_edge.runtime.pipeline import open_pipeline

# ---- shared arguments ------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--artifacts", metavar="DIR", help="exported artifacts (manifest.json + ONNX files)")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (runs the torch reference)")
    p.add_argument("--backend", choices=BACKENDS.names(),
                   help="; ".join(f"{name}: {spec.help}" for name, spec in BACKENDS.items())
                   + " (default: ort for --artifacts, torch for --checkpoint)")
    _add_ort_args(p)
    p.add_argument("--opt-level", default="all", choices=("disable", "basic", "extended", "all"),
                   help="onnxruntime graph optimization level (default all)")
    p.add_argument("--trt-cache", metavar="DIR", help="TensorRT engine cache (default: <artifacts>/trt_cache)")
    p.add_argument("--trt-fp16", action="store_true", help="let the TensorRT provider build fp16 engines")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact files (sizes, paths and the schema are still checked)")
    p.add_argument("--max-images", type=int, metavar="N", help="most images per request (default: the model's max_images)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="most pixels per image, checked on the file header before decoding (default 40000000)")
    p.add_argument("--max-request-pixels", type=int, metavar="N",
                   help="most pixels of all images of one request together (default 100000000)")
    p.add_argument("--max-decode-mib", type=int, metavar="MIB",
                   help="most memory decoding one image may take, estimated from its header (default 192)")
    _add_caching_args(p)


def _add_caching_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("work shared across requests (docs/design.md §5)")
    c.add_argument("--visual-cache-mb", type=int, default=DEFAULT_VISUAL_CACHE_MB, metavar="MB",
                   help=f"visual-feature cache: an image seen before skips vision, codes, h_eos and selector "
                   f"(default {DEFAULT_VISUAL_CACHE_MB}; 0 = off)")
    c.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                   help=f"prefix KV cache: a prompt that starts like an earlier one prefills only the rest "
                   f"(default {DEFAULT_PREFIX_CACHE_MB}; 0 = off)")
    c.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="continuous batching: concurrent requests share decode steps, up to N per step "
                   "(default 4; 1 = off; needs the shared-buffer decoder of `export --decoder genai`)")
    c.add_argument("--decode-during-prefill", action="store_true",
                   help="batched decode steps go on while another request encodes and prefills (default: they "
                   "wait for it, so the new request's first token comes sooner and the batch then decodes together)")


def _add_ort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", action="append", choices=PROVIDERS.names(),
                   help="onnxruntime execution provider (repeat for a preference order; default: cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads (default 0 = onnxruntime's choice, one per physical core)")


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    """The PipelineOptions a command's --artifacts/--checkpoint/--backend/--provider/... ask for."""
    return PipelineOptions(
        artifacts=args.artifacts, checkpoint=args.checkpoint, backend=args.backend,
        providers=tuple(args.provider or ("cpu",)), threads=args.threads, opt_level=args.opt_level,
        trt_cache=args.trt_cache, trt_fp16=args.trt_fp16, verify=not args.no_verify,
        max_images=args.max_images, max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
        max_decode_bytes=None if args.max_decode_mib is None else args.max_decode_mib * 2**20,
        visual_cache_mb=args.visual_cache_mb, prefix_cache_mb=args.prefix_cache_mb, max_batch=args.max_batch,
        prefill_first=not args.decode_during_prefill,
    )


def _gen_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "mode": args.mode,
                            "keep_ratio": args.keep_ratio, "stop": args.stop or (),
                            "stop_token_ids": args.stop_token_id or (),
                            "visual_token_budget": args.visual_token_budget, "min_patches": args.min_patches,
                            "h_eos": args.h_eos}
    if args.greedy:
        opts["greedy"] = True
    if args.temperature is not None:
        opts["temperature"] = args.temperature
    if args.top_k is not None:
        opts["top_k"] = args.top_k
    if args.top_p is not None:
        opts["top_p"] = args.top_p
    return opts


def format_timings(t: Any) -> str:
    stages = " | ".join(f"{name} {ms:.1f}" for name, ms in t.stages().items())
    return (f"timings (ms): {stages}\n"
            f"total {t.total_ms:.1f} ms (stages sum {t.stages_sum_ms:.1f}) | TTFT {t.ttft_ms:.1f} ms | "
            f"decode {t.decode_tokens_per_s:.1f} tokens/s")


def _print_result(res: Any, images: list[str], file: Any) -> None:
    n = len(res.visual_tokens_per_image)
    if n:
        detail = ""
        if res.mode == "hybrid" and res.selected_indices is not None:
            k = len(res.selected_indices[0])
            where = ", h_eos read in context" if res.h_eos == "context" else ""
            detail = f" (discrete codes + {k} selected patches, keep_ratio {res.keep_ratio}{where})"
        print(f"visual tokens per image: {res.visual_tokens_per_image}{detail}, mode {res.mode}", file=file)
    print(f"prompt {res.prompt_tokens} tokens, generated {len(res.token_ids)} ({res.finish_reason}), "
          f"backend {res.backend}", file=file)
    print(format_timings(res.timings), file=file)


# ---- generate -------------------------------------------------------------------------------------


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt of --prompt, or of --prompt-file (UTF-8; "-" reads stdin; one trailing newline
    is dropped, as `$(cat file)` would). Warns when --prompt holds a literal backslash-n and no
    newline: bash keeps "\n" inside double quotes as two characters, and the model then sees them."""
    if args.prompt_file is not None:
        try:
            if args.prompt_file == "-":
                text = sys.stdin.buffer.read().decode("utf-8")
            else:
                text = Path(args.prompt_file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"--prompt-file {args.prompt_file}: file not found") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({exc})") from None
        except OSError as exc:
            raise InputError(f"--prompt-file {args.prompt_file} cannot be read ({exc.strerror or exc})") from None
        return text[:-1] if text.endswith("\n") else text
    prompt = args.prompt
    if "\\n" in prompt and "\n" not in prompt:
        print("maven-edge generate: warning: the prompt holds a literal \\n (a backslash and an n) and no line "
              "break, so the model sees those two characters. In bash, write line breaks as "
              "$'...\\n...' or use --prompt-file FILE", file=sys.stderr)
    return prompt


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    pipe = open_pipeline(pipeline_options(args))
    images = args.image or []
    opts = _gen_options(args)
    video = None
    if args.video:
        if images:
            raise InputError("give --image(s) or one --video, not both")
        if "<image>" in prompt:
            raise InputError("with --video, --prompt is the question about the video (the Frame k: <image> lines "
                             "are added for you); leave out <image>")
        video = pipe.load_video(args.video, prompt, fps=args.fps, max_frames=args.max_frames,
                                max_new_tokens=args.max_new_tokens, mode=args.mode, keep_ratio=args.keep_ratio)
        images, prompt = video.frames, video.prompt
    if args.stream:
        out = sys.stderr if args.json else sys.stdout
        stream = pipe.stream(images, prompt, **opts)
        with stream:
            for piece in stream:
                print(piece, end="", file=out, flush=True)
        print(file=out)
        res = stream.result
    else:
        res = pipe.generate(images, prompt, **opts)
    if args.json:
        d = res.to_dict()
        d["backend_info"] = pipe.backend.describe()
        if video is not None:
            d["video"] = video.metadata
        print(json.dumps(d, indent=None if args.compact else 2))
    else:
        if not args.stream:
            print(res.text)
        if not args.quiet:
            _print_result(res, images, sys.stderr)
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless sampling is asked for)")
    p.add_argument("--temperature", type=positive_float("--temperature"), metavar="T",
                   help="sample with this temperature, a number > 0 (default: greedy decoding)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, metavar="ID", help="stop token id (repeatable)")
    p.add_argument("--mode", choices=("hybrid", "discrete", "continuous"), help="visual encoding (default: the model's mode, hybrid for the shipped one)")
    p.add_argument("--keep-ratio", type=float,
                   help="fraction of patches the selector keeps (hybrid; default: the artifacts' keep ratio)")
    p.add_argument("--visual-token-budget", type=int, metavar="N",
                   help="hybrid: rank the patches of all images together and keep the best so codes + patches fit "
                   "N visual tokens (instead of one keep ratio per image; docs/budget.md; default: off)")
    p.add_argument("--min-patches", type=int, default=1, metavar="M",
                   help="with --visual-token-budget: patches every image keeps at least (default 1)")
    p.add_argument("--h-eos", choices=H_EOS_MODES, default=None,
                   help="hybrid: where the selector's h_eos is read: 'separate' (one extra decoder pass per image "
                   "over its codes, as the model was trained; default) or 'context' (inside the prefill, no extra "
                   "pass; docs/design.md section 5.2)")


# ---- demo -------------------------------------------------------------------------------------------


def ensure_demo_artifacts(out: Path, checkpoint: Path, log: Any = print, decoder: str = "torch") -> Path:
    """Export `checkpoint` to `out` unless `out` already holds the export of exactly these weights,
    made with this `decoder` ("torch": torch.onnx; "genai": onnxruntime-genai's builder, the
    shared-buffer decoder continuous batching needs)."""

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"the demo runs the shipped tiny checkpoint, but {weights} is missing. Restore it with "
            "`git checkout -- model_src/checkpoints/tiny`, train one with `maven-edge train` (see README), or "
            "run `maven-edge demo --artifacts DIR` on artifacts you exported yourself"
        )
    digest = sha256_file(weights)
    model = None
    if (out / MANIFEST).is_file():
        try:
            manifest = load_manifest(out, verify=True)
        except MavenError as exc:  # a broken or tampered export: rebuild it
            log(f"{out} is not a usable export ({exc}); re-exporting")
        else:
            source = manifest.extra.get("source") or {}
            if source.get("weights_sha256") == digest and source.get("decoder", "torch") == decoder:
                return out
            # Exported some other way (e.g. `maven-edge export`): compare the model fingerprints.
            from maven_edge.export.onnx_export import model_fingerprint
            from maven_edge.model_src.checkpoint import load_checkpoint

            model = load_checkpoint(checkpoint)
            shared = bool(manifest.components["decoder"].extra.get("past_present_share_buffer"))
            if manifest.extra.get("model_fingerprint") == model_fingerprint(model) and shared == (decoder != "torch"):
                return out
            log(f"{out} holds the export of another model; re-exporting {checkpoint}")
    log(f"exporting {checkpoint} to {out} (once; a few minutes on a small CPU) ...")
    from maven_edge.export.onnx_export import ExportOptions, export_model
    from maven_edge.model_src.checkpoint import load_checkpoint

    model = model or load_checkpoint(checkpoint)
    source = {"checkpoint": str(checkpoint), "weights_sha256": digest, "decoder": decoder}
    export_model(model, ExportOptions(out=out, force=True, progress=False, decoder=decoder), source=source)
    return out


def demo_artifacts_dir() -> Path:
    """Where the demo keeps its export of the shipped checkpoint: the user cache directory."""
    return cache_dir("demo", "tiny")


def cmd_demo(args: argparse.Namespace) -> int:
    samples = samples_dir()
    demo = json.loads((samples / "demo.json").read_text())
    images = [str(samples / name) for name in demo["images"]]
    if args.artifacts:
        artifacts = Path(args.artifacts)
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
        artifacts = ensure_demo_artifacts(demo_artifacts_dir(), checkpoint, log=lambda m: print(m, file=sys.stderr))
    pipe = open_pipeline(PipelineOptions(artifacts=artifacts, providers=tuple(args.provider or ("cpu",)),
                                         threads=args.threads))
    res = pipe.generate(images, demo["prompt"], max_new_tokens=args.max_new_tokens)
    if args.json:
        d = res.to_dict()
        d.update({"images": images, "prompt": demo["prompt"], "expected": demo.get("answer"),
                  "backend_info": pipe.backend.describe()})
        print(json.dumps(d, indent=2))
        return 0
    info = pipe.backend.describe()
    print(f"maven-edge demo: {pipe.config.name} model, onnxruntime {info.get('onnxruntime')} "
          f"{info.get('providers', ['?'])[0]}, artifacts {artifacts}")
    print("images: " + ", ".join(Path(i).name for i in images))
    print("prompt: " + demo["prompt"].replace("\n", " | "))
    print(f"answer: {res.text.strip()}" + (f"    (expected: {demo['answer']})" if demo.get("answer") else ""))
    _print_result(res, images, sys.stdout)
    if res.selected_indices:
        for name, idx in zip(demo["images"], res.selected_indices, strict=True):
            print(f"  {name}: kept patches {idx}")
    return 0


# ---- inspect -------------------------------------------------------------------------------------------


def draw_selection(images: list[Any], selection: Any, cfg: Any, out: Path, cell: int = 256) -> Path:
    """One PNG: each image as the model sees it (fitted to a square), unselected patches dimmed,
    selected ones outlined, with the patch grid; images side by side."""
    from PIL import Image, ImageDraw


    fill = tuple(int(round(m * 255)) for m in cfg.preprocess.mean)
    g = selection.grid
    size = max(cell, g * 4)
    size -= size % g
    step = size // g
    margin = 8
    canvas = Image.new("RGB", (len(images) * (size + margin) + margin, size + 2 * margin + 14), "white")
    draw_c = ImageDraw.Draw(canvas)
    for i, src in enumerate(images):
        im = load_image(src)
        if cfg.preprocess.pad_to_square:  # resize first: a padded full-size canvas grows with the long side squared
            im = fit_to_square(im, size, fill, Image.Resampling.BICUBIC).convert("RGBA")
        else:
            im = im.resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
        shade = Image.new("RGBA", im.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(shade)
        keep = set(selection.selected_indices[i])
        for p in range(g * g):
            r, c = divmod(p, g)
            box = (c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1)
            if p in keep:
                d.rectangle(box, outline=(255, 40, 40, 255), width=max(1, step // 12))
            else:
                d.rectangle(box, fill=(0, 0, 0, 140))
        im = Image.alpha_composite(im, shade).convert("RGB")
        x = margin + i * (size + margin)
        canvas.paste(im, (x, margin))
        draw_c.text((x, size + margin + 2), f"image {i + 1}: {len(keep)}/{g * g} patches kept", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    pipe = open_pipeline(pipeline_options(args))
    if not args.image:
        raise InputError("give at least one --image")
    sel = pipe.select_patches(args.image, keep_ratio=args.keep_ratio)
    path = draw_selection(args.image, sel, pipe.config, Path(args.out))
    if args.json:
        print(json.dumps({"out": str(path), "selected_indices": sel.selected_indices, "grid": sel.grid,
                          "keep_ratio": sel.keep_ratio}))
    else:
        for name, idx in zip(args.image, sel.selected_indices, strict=True):
            print(f"{name}: {len(idx)} of {sel.grid ** 2} patches kept: {idx}")
        print(f"wrote {path}")
    return 0


# ---- registration -------------------------------------------------------------------------------------


PROMPT_EXAMPLE = "$'<image>\\nQuestion: what color is the circle?\\nAnswer:'"


def register(sub: Any) -> None:
    p = add_command(
        sub, "generate", help="answer a question about images (ort, torch or trt backend)",
        description="Answer a prompt about one or more images. Each --image fills one <image> placeholder of the "
        "prompt, in order; the answer goes to stdout, timings to stderr.\n\nLine breaks: bash keeps \\n inside "
        "double quotes as a backslash and an n, so write prompts with line breaks as $'...\\n...' (bash's "
        "ANSI-C quoting), or put the prompt in a file and pass --prompt-file FILE.",
        examples=[
            "maven-edge export --checkpoint model_src/checkpoints/tiny --out artifacts/tiny",
            f"maven-edge generate --artifacts artifacts/tiny --image model_src/samples/demo_1.png --prompt {PROMPT_EXAMPLE}",
            "maven-edge generate --artifacts artifacts/tiny --image model_src/samples/demo_1.png "
            "--image model_src/samples/demo_2.png --prompt-file question.txt --stream",
            f"maven-edge generate --checkpoint model_src/checkpoints/tiny --image model_src/samples/demo_1.png "
            f"--prompt {PROMPT_EXAMPLE} --json",
        ])
    _add_model_args(p)
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image, for the next <image> of the prompt (repeat for several; default: none)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the prompt, one <image> per image; line breaks as $'...\\n...' in bash "
                      "(with --video: the question about the video)")
    text.add_argument("--prompt-file", metavar="FILE",
                      help="read the prompt from this UTF-8 file ('-' = stdin); one trailing newline is dropped")
    v = p.add_argument_group("video (needs PyAV: pip install -c constraints.txt 'maven-edge[video]')")
    v.add_argument("--video", metavar="PATH", help="a video file (MP4, WebM, ...): its frames, labelled Frame k:, "
                   "and --prompt is the question about it (default: none)")
    v.add_argument("--fps", type=float, default=1.0, help="frames per second to sample (default 1)")
    v.add_argument("--max-frames", type=int, default=8,
                   help="most frames kept, spread over the whole video when it has more (default 8)")
    _add_generation_args(p)
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, timings, visual_tokens_per_image, ...)")
    p.add_argument("--compact", action="store_true", help="with --json: one line")
    p.add_argument("--quiet", action="store_true", help="print only the answer")
    p.set_defaults(func=cmd_generate)

    d = add_command(
        sub, "demo", help="export the shipped tiny model if needed and answer the bundled demo question",
        description="Exports the shipped tiny checkpoint into the user cache directory (once; $MAVEN_EDGE_CACHE or "
        "the platform's cache folder), then answers the bundled multi-image question with onnxruntime, printing "
        "the answer, per-stage timings and visual-token counts.",
        examples=["maven-edge demo", "maven-edge demo --threads 2 --json",
                  "maven-edge demo --artifacts artifacts/tiny"])
    d.add_argument("--artifacts", metavar="DIR", help="use these artifacts instead of exporting the shipped model")
    d.add_argument("--checkpoint", metavar="DIR",
                   help="checkpoint to export when artifacts are needed (default: the shipped tiny model)")
    _add_ort_args(d)
    d.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="most tokens to generate (default 16)")
    d.add_argument("--json", action="store_true",
                   help="print one JSON object (answer, expected answer, timings, ...) instead of the summary")
    d.set_defaults(func=cmd_demo)

    i = add_command(
        sub, "inspect", help="draw the patches the selector keeps over each image (PNG)",
        description="Runs the visual stages in hybrid mode (vision encoder, discrete tokenizer, h_eos, patch "
        "selector) and writes one PNG: each image as the model sees it, the patches the selector keeps outlined, "
        "the rest dimmed. Prints the kept patch indices (raster order) per image.",
        examples=["maven-edge inspect --artifacts artifacts/tiny --image model_src/samples/demo_1.png "
                  "--out selection.png",
                  "maven-edge inspect --checkpoint model_src/checkpoints/tiny --image model_src/samples/demo_1.png "
                  "--image model_src/samples/demo_2.png --keep-ratio 0.5 --out selection.png --json"])
    _add_model_args(i)
    i.add_argument("--image", action="append", metavar="PATH", required=True,
                   help="an image to inspect (repeat for several, side by side in the PNG)")
    i.add_argument("--keep-ratio", type=float,
                   help="fraction of patches to keep, in (0, 1] (default: the artifacts' keep ratio)")
    i.add_argument("--out", required=True, metavar="PNG", help="the PNG to write")
    i.add_argument("--json", action="store_true",
                   help="print the kept indices, the grid size and the PNG path as one JSON object")
    i.set_defaults(func=cmd_inspect)

"""`maven-edge serve` (one process, or Ray Serve replicas) and `maven-edge bench-serve`.

Nothing heavy at import time: fastapi, uvicorn, ray and httpx are imported by the commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from maven_edge.core.config import H_EOS_MODES
from maven_edge.core.errors import ArtifactError, InputError
from maven_edge.core.manifest import MANIFEST
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from maven_edge.runtime.commands import _add_model_args, pipeline_options

SERVE_EXAMPLES = """\
examples:
  # the shipped tiny model (exported into the user cache on first use, like `maven-edge demo`), on 127.0.0.1:8000
  maven-edge serve --demo

  # 2 generations at once, 8 waiting, 60 s per request, an API key, reachable from the LAN
  MAVEN_EDGE_API_KEY=secret maven-edge serve --artifacts artifacts/tiny --host 0.0.0.0 \\
      --max-concurrency 2 --max-queue 8 --request-timeout 60

  # Ray Serve: 2 replicas on this machine (pip install -c constraints.txt 'maven-edge[ray]')
  maven-edge serve --demo --ray --replicas 2 --threads 1

  # Ray Serve on a running cluster, autoscaling between 1 and 8 replicas
  maven-edge serve --artifacts /shared/artifacts/tiny --ray --address auto --host 0.0.0.0 \\
      --min-replicas 1 --max-replicas 8 --target-ongoing-requests 2

then, with any OpenAI client:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "tiny",
    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
    {"type": "text", "text": "what color is the circle?"}]}]}'
"""

BENCH_EXAMPLES = """\
examples:
  maven-edge serve --demo --exit-after 600 &      # a server to measure (stops by itself)
  maven-edge bench-serve --url http://127.0.0.1:8000 --concurrency 4 --requests 200
  maven-edge bench-serve --concurrency 8 --requests 400 --max-tokens 16 --json --out bench.json
"""


def _host_port(args: argparse.Namespace) -> tuple[str, int]:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    return args.host, args.port


def server_config(args: argparse.Namespace) -> Any:
    """The ServerConfig the serve command's arguments describe."""
    from maven_edge.core.preprocess import ImageLimits
    from maven_edge.serving.config import API_KEY_ENV, ServerConfig
    from maven_edge.serving.images import SERVER_FORMATS, ImagePolicy

    if args.demo:
        if args.artifacts or args.checkpoint:
            raise InputError("--demo serves the shipped tiny model: leave out --artifacts/--checkpoint")
        from maven_edge.model_src.resources import shipped_checkpoint
        from maven_edge.runtime.commands import demo_artifacts_dir, ensure_demo_artifacts

        args.artifacts = str(ensure_demo_artifacts(demo_artifacts_dir(), shipped_checkpoint(),
                                                   log=lambda m: print(m, file=sys.stderr)))
    elif not (args.artifacts or args.checkpoint):
        raise InputError("give --artifacts DIR (exported with `maven-edge export`), --checkpoint DIR, or --demo")
    opts = pipeline_options(args)  # incl. the runtime's --visual-cache-mb / --prefix-cache-mb / --max-batch
    opts.caching()  # checks the values
    opts.backend_name()  # artifacts xor checkpoint, and the backend fits
    if opts.artifacts is not None and not (Path(opts.artifacts) / MANIFEST).is_file():
        raise ArtifactError(f"{opts.artifacts} holds no {MANIFEST}; export a model with `maven-edge export "
                            "--checkpoint DIR --out DIR` (or `maven-edge demo` for the shipped tiny model)")
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_dir():
        raise InputError(f"--checkpoint {opts.checkpoint}: not a directory")
    max_image_bytes = int(args.max_image_mb * 2**20) if args.max_image_mb else int(args.max_body_mb * 2**20)
    limits = ImageLimits(formats=SERVER_FORMATS, max_bytes=max(1, max_image_bytes),
                         **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    policy = ImagePolicy(limits=limits, local_root=Path(args.allow_local_images) if args.allow_local_images else None,
                         allow_remote=args.allow_remote_images, remote_timeout_s=args.remote_timeout,
                         remote_max_redirects=args.remote_max_redirects,
                         video_max_bytes=int(args.max_video_mb * 2**20), video_fps=args.video_fps,
                         video_max_frames=args.video_max_frames)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return ServerConfig(
        pipeline=opts, model_name=args.model_name, api_key=api_key, max_concurrency=args.max_concurrency,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), default_max_tokens=args.default_max_tokens,
        h_eos=args.h_eos,
        images=policy, warmup=not args.no_warmup,
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(levelname)s:  %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    host, port = _host_port(args)
    _setup_logging(args.log_level)
    if args.ray:
        from maven_edge.serving.ray_serve import RayOptions, run_ray

        ray_opts = RayOptions(address=args.address, replicas=args.replicas, min_replicas=args.min_replicas,
                              max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                              num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_queued_requests=args.ray_max_queued)
        return run_ray(config, ray_opts, host=host, port=port, exit_after_s=args.exit_after)
    ray_only = [flag for flag, value in (("--replicas", args.replicas), ("--address", args.address),
                                         ("--max-replicas", args.max_replicas)) if value is not None]
    if ray_only:
        raise InputError(f"{', '.join(ray_only)} only apply with --ray")
    from maven_edge.serving.server import run_server

    return run_server(config, host=host, port=port, exit_after_s=args.exit_after, log_level=args.log_level,
                      access_log=not args.no_access_log)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from maven_edge.serving.bench import BenchOptions, format_report, run_bench

    opts = BenchOptions(url=args.url, api_key=args.api_key if args.api_key is not None
                        else os.environ.get("MAVEN_EDGE_API_KEY") or None,
                        model=args.model, concurrency=args.concurrency, requests=args.requests,
                        max_tokens=args.max_tokens, warmup=args.warmup, timeout_s=args.timeout,
                        wait_ready_s=args.wait_ready, same_images=args.same_images)
    report = run_bench(opts)
    if args.out:
        import json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API (uvicorn, or Ray Serve replicas)",
        description="An OpenAI-compatible server: POST /v1/chat/completions (multi-image, image_url parts as "
        "data: URIs, streaming), GET /v1/models, GET /health, GET /metrics (Prometheus). See docs/serving.md.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, required=False)
    p.add_argument("--demo", action="store_true",
                   help="serve the shipped tiny model (exported into the user cache on first use, as `maven-edge demo` "
                   "does)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    net.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $MAVEN_EDGE_API_KEY, "
                     "else no auth)")
    net.add_argument("--model-name", help="the model id clients send (default: the model's name, e.g. tiny)")
    lim = p.add_argument_group("admission and limits")
    lim.add_argument("--max-concurrency", type=int, default=1, help="generations running at once (default 1)")
    lim.add_argument("--max-queue", type=int, default=16,
                     help="requests waiting for a slot; beyond it: 429 with Retry-After (default 16)")
    lim.add_argument("--request-timeout", type=float, default=120.0,
                     help="seconds per request, queue wait + generation (default 120)")
    lim.add_argument("--max-body-mb", type=float, default=8.0, help="request body limit in MiB; beyond: 413 (default 8)")
    lim.add_argument("--max-image-mb", type=float, help="encoded size limit per image in MiB (default: the body limit)")
    lim.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"tokens to generate when a request gives no max_tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    lim.add_argument("--h-eos", choices=H_EOS_MODES, default="separate",
                     help="hybrid: where h_eos is read when a request does not say ('h_eos' in its body): "
                     "'separate' (an extra decoder pass per image; default) or 'context' (inside the prefill, "
                     "no extra pass: a faster first answer; docs/design.md section 5.2)")
    img = p.add_argument_group("image sources (data: URIs are always accepted)")
    img.add_argument("--allow-local-images", metavar="DIR",
                     help="accept local paths and file:// URLs inside DIR (and only there)")
    img.add_argument("--allow-remote-images", action="store_true",
                     help="fetch http(s) image URLs (the server then makes requests wherever clients point it)")
    img.add_argument("--remote-timeout", type=float, default=10.0, help="seconds per remote image fetch (default 10)")
    img.add_argument("--remote-max-redirects", type=int, default=3, help="redirects per remote image (default 3)")
    vid = p.add_argument_group("video (video_url parts; needs PyAV: pip install -c constraints.txt 'maven-edge[video]')")
    vid.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    vid.add_argument("--video-max-frames", type=int, default=8,
                     help="most frames per video, spread over it when it has more (default 8)")
    vid.add_argument("--max-video-mb", type=float, default=64.0, help="encoded size limit per video in MiB (default 64)")
    ops = p.add_argument_group("operation")
    ops.add_argument("--no-warmup", action="store_true", help="skip the 1-token warm-up generation after loading")
    ops.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="the server's log level (default info)")
    ops.add_argument("--no-access-log", action="store_true", help="do not log every request")
    ops.add_argument("--exit-after", type=float, metavar="SECONDS", help="stop by itself after this many seconds")
    ray = p.add_argument_group("Ray Serve (pip install -c constraints.txt 'maven-edge[ray]')")
    ray.add_argument("--ray", action="store_true", help="deploy the same app as a Ray Serve deployment")
    ray.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    ray.add_argument("--address", help="Ray cluster to join ('auto' = the one `ray start` runs here; default: start "
                     "a local Ray)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling: most replicas (turns autoscaling on)")
    ray.add_argument("--target-ongoing-requests", type=float,
                     help="autoscaling: requests per replica Ray aims for (default: --max-concurrency)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica (default 0)")
    ray.add_argument("--ray-max-queued", type=int, default=-1,
                     help="requests Ray's router may hold when every replica is full; beyond: 503 (default -1: "
                     "no limit)")
    p.set_defaults(func=cmd_serve)

    b = sub.add_parser(
        "bench-serve", help="load-test a running server: throughput, TTFT and latency percentiles",
        description="K concurrent clients send a fixed number of streamed multi-image questions built from the "
        "shipped sample images (each request's images made unique by one pixel unless --same-images), and report requests/s, tokens/s, p50/p95/p99 TTFT and end-to-end latency, and "
        "errors by status.", epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    b.add_argument("--api-key", help="bearer key (default: $MAVEN_EDGE_API_KEY)")
    b.add_argument("--model", help="model id (default: the first from GET /v1/models)")
    b.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    b.add_argument("--requests", type=int, default=100, help="requests in all (default 100)")
    b.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    b.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted (default 2)")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    b.add_argument("--same-images", action="store_true",
                   help="send the sample images unchanged every time (the server's caches then answer for them); "
                   "default: each request's images differ in one pixel")
    b.add_argument("--wait-ready", type=float, default=300.0,
                   help="seconds to wait for GET /health to say ready before starting (default 300)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.add_argument("--out", metavar="FILE", help="also write the JSON report here")
    b.set_defaults(func=cmd_bench_serve)


"""`maven-edge bench-serve`: load-test a running OpenAI-compatible server.

K concurrent clients (one asyncio task each, over one httpx connection pool) send ``requests``
streamed chat completions in all, taken in turn from a fixed list of multi-image questions about
the shipped sample images (sent as data: URIs; by default each request's images differ in one pixel,
so the server's caches cannot answer for it). Measured per request, at the client: TTFT (until the
first content chunk), end-to-end latency (until ``[DONE]``), completion tokens (from the usage
chunk). Reported: requests/s and completion tokens/s over the wall time of the measured requests,
p50/p95/p99 of TTFT and latency, errors by status, and which replica answered (the
``X-Maven-Replica`` header) so a Ray Serve run shows its spread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from maven_edge.core.errors import InputError
from maven_edge.model_src.resources import samples_dir

#: (sample images by index into demo.json's list, question): every request asks about several images.
QUESTIONS: tuple[tuple[tuple[int, ...], str], ...] = (
    ((0, 1, 2), "which image has a red square?"),
    ((0, 1), "what changed between image 1 and image 2?"),
    ((1, 2), "how many shapes are there in all the images?"),
    ((2, 0, 1), "which image has a red square?"),
    ((0, 2), "is the square in image 1 the same color as the square in image 2?"),
    ((2, 1), "what changed between image 1 and image 2?"),
)


@dataclass
class BenchOptions:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 4
    requests: int = 100
    max_tokens: int = 16
    warmup: int = 2
    timeout_s: float = 300.0
    wait_ready_s: float = 300.0  # poll GET /health this long before starting
    same_images: bool = False  # True: every request reuses the sample images as they are (cache hits)

    def check(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1 or self.warmup < 0:
            raise InputError("--concurrency, --requests and --max-tokens must be >= 1, --warmup >= 0")


def sample_messages(count: int, same_images: bool = False) -> list[list[dict[str, Any]]]:
    """`messages` of `count` requests, taking QUESTIONS in turn. Unless `same_images`, request i's
    images differ from every other request's in one pixel (set from i), so the server's
    visual-feature and prefix caches cannot answer for it, as with clients sending new photos."""
    samples = samples_dir()
    names = json.loads((samples / "demo.json").read_text())["images"]
    images = [Image.open(samples / n).convert("RGB") for n in names]

    def uri(im: Image.Image) -> str:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    fixed = [uri(im) for im in images]
    out = []
    for i in range(count):
        picks, question = QUESTIONS[i % len(QUESTIONS)]
        parts: list[dict[str, Any]] = []
        for k in picks:
            if same_images:
                url = fixed[k]
            else:
                im = images[k].copy()
                im.putpixel((0, 0), (i % 256, (i // 256) % 256, 255 - k))
                url = uri(im)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        parts.append({"type": "text", "text": question})
        out.append([{"role": "user", "content": parts}])
    return out


@dataclass
class Sample:
    status: str  # "200", an HTTP status, "stream_error" or "exception:<Type>"
    ttft_s: float | None = None
    latency_s: float | None = None
    completion_tokens: int = 0
    replica: str | None = None


async def _one(client: Any, opts: BenchOptions, model: str, messages: list[dict[str, Any]]) -> Sample:
    body = {"model": model, "messages": messages, "max_tokens": opts.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            replica = resp.headers.get("x-maven-replica")
            if resp.status_code != 200:
                await resp.aread()
                return Sample(str(resp.status_code), replica=replica)
            ttft = None
            tokens = 0
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Sample("stream_error", replica=replica)
                if event.get("usage"):
                    tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices", []):
                    if ttft is None and choice.get("delta", {}).get("content"):
                        ttft = time.perf_counter() - start
            if not done:
                return Sample("stream_error", replica=replica)
            latency = time.perf_counter() - start
            return Sample("200", ttft if ttft is not None else latency, latency, tokens, replica)
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point
        return Sample(f"exception:{type(exc).__name__}")


async def _wait_ready(client: Any, opts: BenchOptions) -> None:
    import httpx

    deadline = time.monotonic() + opts.wait_ready_s
    last = "no answer"
    while True:
        try:
            resp = await client.get("/health")
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text[:200]}"
            if resp.status_code == 503 and resp.json().get("status") == "failed":
                break
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    raise InputError(f"the server at {opts.url} is not ready ({last}); start it with `maven-edge serve`")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    a = np.asarray(values) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


async def _bench(opts: BenchOptions) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    limits = httpx.Limits(max_connections=opts.concurrency + 1, max_keepalive_connections=opts.concurrency + 1)
    async with httpx.AsyncClient(base_url=opts.url, headers=headers, timeout=opts.timeout_s, limits=limits,
                                 trust_env=False) as client:
        await _wait_ready(client, opts)
        models = await client.get("/v1/models")
        if models.status_code != 200:
            raise InputError(f"GET {opts.url}/v1/models answered {models.status_code}: {models.text[:300]}")
        model = opts.model or models.json()["data"][0]["id"]
        requests = sample_messages(opts.warmup + opts.requests, opts.same_images)
        for i in range(opts.warmup):
            await _one(client, opts, model, requests[opts.requests + i])
        counter = iter(range(opts.requests))
        samples: list[Sample] = []

        async def worker() -> None:
            for i in counter:
                samples.append(await _one(client, opts, model, requests[i % len(requests)]))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(opts.concurrency)))
        wall = time.perf_counter() - start
    ok = [s for s in samples if s.status == "200"]
    tokens = sum(s.completion_tokens for s in ok)
    return {
        "url": opts.url, "model": model, "options": asdict(opts) | {"api_key": None},
        "requests": len(samples), "ok": len(ok) == len(samples), "succeeded": len(ok),
        "errors": dict(Counter(s.status for s in samples if s.status != "200")),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "completion_tokens": tokens, "completion_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": _percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
        "latency_ms": _percentiles([s.latency_s for s in ok if s.latency_s is not None]),
        "replicas": dict(Counter(s.replica for s in samples if s.replica)),
        "images_per_request": sorted({len(p) for p, _ in QUESTIONS}),
    }


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    opts.check()
    return asyncio.run(_bench(opts))


def format_report(r: dict[str, Any]) -> str:
    def row(name: str, d: dict[str, float | None]) -> str:
        return f"{name:<12}" + "".join(f"{k} {v:8.1f} ms   " if v is not None else f"{k} -   " for k, v in d.items())

    o = r["options"]
    lines = [
        f"bench-serve {r['url']} model {r['model']}: {r['requests']} requests, {o['concurrency']} concurrent clients, "
        f"max_tokens {o['max_tokens']}, {r['images_per_request']} images per request"
        + (" (the same images every time)" if o["same_images"] else " (new images every request)"),
        f"succeeded {r['succeeded']}/{r['requests']}" + (f", errors {r['errors']}" if r["errors"] else ""),
        f"throughput  {r['requests_per_s']:.2f} requests/s, {r['completion_tokens_per_s']:.1f} completion tokens/s "
        f"(wall {r['wall_s']:.1f} s)",
        row("TTFT", r["ttft_ms"]),
        row("latency", r["latency_ms"]),
    ]
    if r["replicas"]:
        lines.append("replicas    " + ", ".join(f"{k}: {v}" for k, v in sorted(r["replicas"].items())))
    return "\n".join(lines)

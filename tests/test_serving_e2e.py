"""`maven-edge serve` end to end: real server processes on 127.0.0.1 (a free port each, torch never
imported), driven by the official `openai` client and by raw HTTP (issue 32's "what must hold").

Servers: ``tiny`` runs the shipped tiny checkpoint's export (the demo's; exported once into
.pytest_cache) for the "same answer as `maven-edge generate`" checks; ``main`` (4 concurrent
generations, an API key, small body and pixel limits, local and remote images allowed) and ``small``
(1 generation, a queue of 1, nothing opted in) run the seeded random test model, whose answers never
stop early, so a request's length is set by max_tokens.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from serving_helpers import DEMO, SAMPLES, ServerProcess, data_uri, png_bytes, user

from maven_edge.cli import main as cli_main

DEMO_IMAGES = [SAMPLES / n for n in DEMO["images"]]
KEY = "test-key"
ENV_KEY = "env-key"


@pytest.fixture(scope="module")
def test_artifacts(pytestconfig) -> Path:
    from tools import soak

    return soak.cached_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


@pytest.fixture(scope="module")
def tiny_artifacts() -> Path:
    from maven_edge.model_src.resources import shipped_checkpoint
    from maven_edge.runtime.commands import demo_artifacts_dir, ensure_demo_artifacts

    return ensure_demo_artifacts(demo_artifacts_dir(), shipped_checkpoint(), log=lambda m: None)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("allowed-images")
    (d / "demo_1.png").write_bytes(DEMO_IMAGES[0].read_bytes())
    (d.parent / "outside.png").write_bytes(DEMO_IMAGES[1].read_bytes())
    return d


def _server(args, tmp_path_factory, name, env=None):
    server = ServerProcess(args, tmp_path_factory.mktemp(name) / "server.log", env=env)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def tiny(tiny_artifacts, tmp_path_factory):
    server = _server(["--artifacts", str(tiny_artifacts), "--threads", "1", "--max-concurrency", "4",
                      "--max-queue", "64"], tmp_path_factory, "tiny",
                     env={"MAVEN_EDGE_API_KEY": ENV_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def main(test_artifacts, image_dir, tmp_path_factory):
    server = _server(["--artifacts", str(test_artifacts), "--threads", "1", "--api-key", KEY,
                      "--max-concurrency", "4", "--max-queue", "64", "--max-body-mb", "2", "--max-image-mb", "1",
                      "--max-pixels", "100000", "--allow-local-images", str(image_dir), "--allow-remote-images",
                      "--remote-max-redirects", "2", "--remote-timeout", "5"], tmp_path_factory, "main",
                     env={"MAVEN_EDGE_API_KEY": ""})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small(test_artifacts, tmp_path_factory):
    server = _server(["--artifacts", str(test_artifacts), "--threads", "1", "--max-concurrency", "1",
                      "--max-queue", "1"], tmp_path_factory, "small", env={"MAVEN_EDGE_API_KEY": ""})
    yield server
    server.stop()


def _generate(artifacts: Path, images, prompt: str, capsys, max_new_tokens: int = 16, extra=()) -> dict:
    """`maven-edge generate --json` (in this process), the reference for the server's answers."""
    capsys.readouterr()
    args = ["generate", "--artifacts", str(artifacts), "--threads", "1", "--prompt", prompt, "--json", "--compact",
            "--max-new-tokens", str(max_new_tokens), *extra]
    for im in images:
        args += ["--image", str(im)]
    assert cli_main(args) == 0
    return json.loads(capsys.readouterr().out)


# ---- the same answers as `maven-edge generate` --------------------------------------------------------


def test_two_image_question_equals_generate_streamed_or_not(tiny, tiny_artifacts, capsys):
    images = DEMO_IMAGES[:2]
    question = "which image has a red square?"
    prompt = f"Image 1: <image>\nImage 2: <image>\nQuestion: {question}\nAnswer:"
    ref = _generate(tiny_artifacts, images, prompt, capsys)
    assert ref["text"].strip()  # the trained model answers something ("image 2"-like)
    client = tiny.client(ENV_KEY)
    uris = [data_uri(p) for p in images]
    # the chat template places the images, or the prompt places them itself: the same prompt either way
    for messages in ([user(question, *uris)], [user(prompt, *uris, text_first=True)]):
        res = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16)
        assert res.choices[0].message.content == ref["text"]
        assert res.usage.completion_tokens == len(ref["token_ids"])
        assert res.usage.prompt_tokens == ref["prompt_tokens"]
        extra = res.usage.model_extra
        assert extra["visual_tokens_per_image"] == ref["visual_tokens_per_image"]
        assert set(extra["timings"]) >= {"vision_ms", "discrete_ms", "h_eos_ms", "selector_ms", "prefill_ms",
                                          "decode_ms", "ttft_ms", "queue_ms", "inter_token_p50_ms",
                                          "inter_token_p95_ms"}
        assert {"visual_hits", "visual_misses"} <= set(extra["cache"])
        assert res.choices[0].finish_reason == ("length" if ref["finish_reason"] == "length" else "stop")
    # streaming: the pieces join to the same text; the usage chunk agrees
    stream = client.chat.completions.create(model="tiny", messages=[user(question, *uris)], max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])
    # without an API key: 401 (the key came from $MAVEN_EDGE_API_KEY)
    with pytest.raises(openai.AuthenticationError):
        tiny.client("wrong").chat.completions.create(model="tiny", messages=[user(question, *uris)])


def test_multi_turn_with_images_in_two_user_messages(tiny, tiny_artifacts, capsys):
    first, second = DEMO_IMAGES[0], DEMO_IMAGES[2]
    messages = [
        user("what color is the square?", data_uri(first)),
        {"role": "assistant", "content": "red"},
        user("which image has a red square?", data_uri(second)),
    ]
    prompt = ("Image 1: <image>\nQuestion: what color is the square?\nAnswer: red\n"
              "Image 2: <image>\nQuestion: which image has a red square?\nAnswer:")
    ref = _generate(tiny_artifacts, [first, second], prompt, capsys)
    res = tiny.client(ENV_KEY).chat.completions.create(model="tiny", messages=messages, max_tokens=16)
    assert res.choices[0].message.content == ref["text"]
    assert res.usage.prompt_tokens == ref["prompt_tokens"]
    assert res.usage.model_extra["visual_tokens_per_image"] == ref["visual_tokens_per_image"]  # both images


def test_a_video_question_equals_generate_video(tiny, tiny_artifacts, capsys):
    pytest.importorskip("av")
    from maven_edge.model_src.resources import samples_dir

    video = samples_dir() / "demo_video.mp4"
    question = "what happened to the red circle?"
    capsys.readouterr()
    assert cli_main(["generate", "--artifacts", str(tiny_artifacts), "--threads", "1", "--video", str(video),
                     "--prompt", question, "--json", "--compact", "--max-new-tokens", "16"]) == 0
    ref = json.loads(capsys.readouterr().out)
    part = {"type": "video_url", "video_url": {"url": data_uri(video, "video/mp4")}}
    res = tiny.client(ENV_KEY).chat.completions.create(
        model="tiny", max_tokens=16, messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}])
    assert res.choices[0].message.content == ref["text"]
    assert res.usage.prompt_tokens == ref["prompt_tokens"]
    assert res.usage.model_extra["visual_tokens_per_image"] == ref["visual_tokens_per_image"]  # one per frame
    bad = {"type": "video_url", "video_url": {"url": data_uri(b"not a video", "video/mp4")}}
    with pytest.raises(openai.BadRequestError):
        tiny.client(ENV_KEY).chat.completions.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": [bad, {"type": "text", "text": "what?"}]}])


def test_maven_fields_visual_token_budget_and_h_eos_equal_generate(tiny, tiny_artifacts, capsys):
    images = DEMO_IMAGES[:3]
    question = "which image has a red square?"
    prompt = f"Image 1: <image>\nImage 2: <image>\nImage 3: <image>\nQuestion: {question}\nAnswer:"
    client = tiny.client(ENV_KEY)
    uris = [data_uri(p) for p in images]
    for extra, body in ((["--h-eos", "context"], {"h_eos": "context"}),
                        (["--visual-token-budget", "120", "--min-patches", "2"],
                         {"visual_token_budget": 120, "min_patches": 2})):
        ref = _generate(tiny_artifacts, images, prompt, capsys, extra=extra)
        res = client.chat.completions.create(model="tiny", messages=[user(question, *uris)], max_tokens=16,
                                             extra_body=body)
        assert res.choices[0].message.content == ref["text"]
        assert res.usage.prompt_tokens == ref["prompt_tokens"]
        assert res.usage.model_extra["visual_tokens_per_image"] == ref["visual_tokens_per_image"]
    assert sum(ref["visual_tokens_per_image"]) <= 120
    for body, match in (({"h_eos": "inline"}, "h_eos"), ({"visual_token_budget": 10}, "budget"),
                        ({"h_eos": "context", "visual_token_budget": 120}, "one or the other")):
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny", messages=[user(question, *uris)], max_tokens=4,
                                           extra_body=body)


# ---- bad requests --------------------------------------------------------------------------------------


def _post(server, body=None, *, content=None, key=KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        content = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=60,
                      trust_env=False, **kw)


def _openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) > 10
    return err


def _chat(text, *urls, **params):
    return {"model": "tiny", "messages": [user(text, *urls)], "max_tokens": 4, **params}


def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(main, small):
    ok = data_uri(DEMO_IMAGES[0])
    explicit = "Image 1: <image>\nImage 2: <image>\nQuestion: which image has a red square?\nAnswer:"
    err = _openai_error(_post(main, _chat(explicit, ok)), 400)  # two placeholders, one image
    assert err["code"] == "invalid_prompt" and "placeholder" in err["message"]
    err = _openai_error(_post(main, _chat("which?", "data:image/png;base64,iVBORw0KGgo%%%")), 400)
    assert err["code"] == "invalid_image" and "base64" in err["message"]
    err = _openai_error(_post(main, _chat("which?", data_uri(Image.new("RGB", (400, 400))))), 400)
    assert "too large" in err["message"]  # 160,000 pixels over --max-pixels 100000
    err = _openai_error(_post(small, _chat("which?", "https://127.0.0.1:9/a.png"), key=None), 400)
    assert "--allow-remote-images" in err["message"]
    err = _openai_error(_post(small, _chat("which?", str(DEMO_IMAGES[0])), key=None), 400)
    assert "--allow-local-images" in err["message"]
    err = _openai_error(_post(main, _chat("which?", ok, logit_bias={"1": 2})), 400)
    assert err["param"] == "logit_bias" and err["code"] == "unknown_parameter"
    err = _openai_error(_post(main, content=b'{"model": "tiny", "messages": [}'), 400)
    assert err["code"] == "invalid_json"
    big = b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (10 * 2**20) + b'"}'
    err = _openai_error(_post(main, content=big), 413)
    assert "too large" in err["message"]
    err = _openai_error(_post(main, content=(big[i:i + 2**20] for i in range(0, len(big), 2**20))), 413)  # chunked
    err = _openai_error(_post(main, _chat("which?", ok) | {"model": "gpt-4o"}), 404)
    assert err["code"] == "model_not_found"
    _openai_error(_post(main, _chat("which?", ok), key=None), 401)
    _openai_error(_post(main, _chat("which?", ok), key="wrong"), 401)
    _openai_error(httpx.get(main.url + "/v1/chat/completions", trust_env=False), 405)
    # the openai client maps them to its exception classes
    with pytest.raises(openai.BadRequestError) as info:
        main.client(KEY).chat.completions.create(model="tiny", messages=[user("which?", ok)], extra_body={"top_k": 3})
    assert info.value.status_code == 400 and "top_k" in str(info.value)
    # and the server is still fine
    good = _post(main, _chat("what color is the circle?", ok))
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(main.url + "/health", trust_env=False).json()["status"] == "ready"


def test_local_and_remote_images_under_the_operators_limits(main, image_dir):
    ref = _post(main, _chat("what color is the circle?", data_uri(DEMO_IMAGES[0]))).json()
    answer = ref["choices"][0]["message"]["content"]
    local = _post(main, _chat("what color is the circle?", "demo_1.png"))
    assert local.status_code == 200 and local.json()["choices"][0]["message"]["content"] == answer
    err = _openai_error(_post(main, _chat("what color is the circle?", "../outside.png")), 400)
    assert "outside the directory" in err["message"]

    picture = DEMO_IMAGES[0].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            m = re.fullmatch(r"/hop/(\d+)", self.path)
            if m and int(m.group(1)) > 0:
                self.send_response(302)
                self.send_header("Location", f"/hop/{int(m.group(1)) - 1}")
                self.end_headers()
                return
            body = picture if self.path in ("/a.png", "/hop/0") else png_bytes(Image.effect_noise((1200, 1200), 60))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for url in (f"{base}/a.png", f"{base}/hop/2"):  # two redirects are allowed
            res = _post(main, _chat("what color is the circle?", url))
            assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == answer
        err = _openai_error(_post(main, _chat("what color is the circle?", f"{base}/hop/3")), 400)
        assert "redirects more than 2" in err["message"]
        err = _openai_error(_post(main, _chat("what color is the circle?", f"{base}/big.png")), 400)
        assert "larger than the limit of 1.0 MiB" in err["message"]
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- overload and disconnects ---------------------------------------------------------------------------


def test_a_burst_over_the_limits_gets_429s_and_correct_answers(small):
    """Concurrency 1 and a queue of 1: of 8 requests sent at once (each 400 decode steps), one runs,
    one waits and the rest are refused at once with 429 + Retry-After; the served ones are right."""
    messages = [user("which image has a red square?", data_uri(DEMO_IMAGES[0]), data_uri(DEMO_IMAGES[1]))]
    client = small.client()
    reference = client.chat.completions.create(model="tiny", messages=messages, max_tokens=400)
    barrier = threading.Barrier(8)

    def one(_):
        barrier.wait()
        try:
            res = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=400)
            return 200, res.parse().choices[0].message.content, None
        except openai.RateLimitError as exc:
            return 429, exc.body, exc.response.headers.get("retry-after")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    served = [o for o in outcomes if o[0] == 200]
    refused = [o for o in outcomes if o[0] == 429]
    assert len(served) + len(refused) == 8
    assert len(served) >= 2 and len(refused) >= 5, outcomes
    assert all(text == reference.choices[0].message.content for _, text, _ in served)
    for _, body, retry_after in refused:
        assert body["type"] == "rate_limit_error" and "busy" in body["message"]
        assert int(retry_after) >= 1
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).usage.completion_tokens == 2


def _cancelled_count(server) -> float:
    text = httpx.get(server.url + "/metrics", trust_env=False).text
    return float(re.search(r'maven_generations_total\{outcome="cancelled"\} (\S+)', text).group(1))


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_disconnects_frees_its_slot(small, streaming):
    """A long request (800 tokens) is dropped by its client mid-answer (streaming: after three
    chunks; not streaming: a read timeout of a quarter of the time the whole answer took just
    before); the next request gets the only slot within a few decode steps, not when the long one
    would have ended."""
    messages = [user("which image has a red square?", data_uri(DEMO_IMAGES[0]), data_uri(DEMO_IMAGES[1]))]
    long_body = {"model": "tiny", "messages": messages, "max_tokens": 800, "stream": streaming}
    before = _cancelled_count(small)
    with httpx.Client(base_url=small.url, trust_env=False) as client:
        if streaming:
            with client.stream("POST", "/v1/chat/completions", json=long_body, timeout=60) as resp:
                assert resp.status_code == 200
                content_chunks = 0
                for line in resp.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        content_chunks += 1
                    if content_chunks == 3:
                        break  # leaving the block closes the connection mid-stream
        else:
            # how long the whole answer takes on this machine (a fixed read timeout raced it: on a
            # fast CPU the 800 tokens came back inside 0.5 s); the client then leaves a quarter in
            t0 = time.monotonic()
            whole = client.post("/v1/chat/completions", json=long_body, timeout=60)
            whole_s = time.monotonic() - t0
            assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 400
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=long_body, timeout=httpx.Timeout(60, read=whole_s / 4))
    started = time.monotonic()
    res = small.client().chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    elapsed = time.monotonic() - started
    timings = res.usage.model_extra["timings"]
    step_ms = timings["decode_step_mean_ms"]
    # had the long request gone on, the next one would have waited ~780 decode steps
    assert timings["queue_ms"] < max(25 * step_ms, 250.0), (timings, step_ms)
    assert elapsed < 0.5 * 780 * step_ms / 1e3 + 1.0
    assert _cancelled_count(small) == before + 1


# ---- concurrency: no cross-talk ------------------------------------------------------------------------------


def test_eight_clients_times_25_requests_match_the_requests_run_alone(tiny):
    """25 different test-split questions (1 to 4 images each, their own prompts), a third of them
    streamed; 8 clients send 25 each at once (4 generations run together in the server). Every
    answer equals the answer the same request got alone."""
    from maven_edge.model_src.data import get_sample

    samples = [get_sample("test", i) for i in range(25)]
    requests = [{"messages": [user(s.prompt, *(data_uri(im) for im in s.images), text_first=True)],
                 "max_tokens": 12, "stream": i % 3 == 0} for i, s in enumerate(samples)]
    client = tiny.client(ENV_KEY)

    def run(req) -> tuple[str, int]:
        if req["stream"]:
            chunks = list(client.chat.completions.create(model="tiny", messages=req["messages"],
                                                         max_tokens=req["max_tokens"], stream=True,
                                                         stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.completion_tokens
        res = client.chat.completions.create(model="tiny", messages=req["messages"], max_tokens=req["max_tokens"])
        return res.choices[0].message.content, res.usage.completion_tokens

    alone = [run(r) for r in requests]
    assert len(set(alone)) > 10  # the requests really differ

    def client_worker(c: int) -> list[tuple[int, tuple[str, int]]]:
        return [((c * 3 + j) % 25, run(requests[(c * 3 + j) % 25])) for j in range(25)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client_worker, range(8)) for r in rs]
    assert len(results) == 200
    mismatches = [(i, got, alone[i]) for i, got in results if got != alone[i]]
    assert not mismatches, mismatches[:3]


def test_bench_serve_reports_throughput_and_percentiles(tiny, capsys):
    capsys.readouterr()
    assert cli_main(["bench-serve", "--url", tiny.url, "--api-key", ENV_KEY, "--concurrency", "2", "--requests", "6",
                     "--max-tokens", "8", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["succeeded"] == 6 and report["errors"] == {}
    assert report["requests_per_s"] > 0 and report["completion_tokens"] > 0
    for key in ("ttft_ms", "latency_ms"):
        d = report[key]
        assert 0 < d["p50"] <= d["p95"] <= d["p99"]
    assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert sum(report["replicas"].values()) == 6
    # a server that is not there: a clear error, not a traceback
    assert cli_main(["bench-serve", "--url", "http://127.0.0.1:9", "--wait-ready", "0.5", "--requests", "1"]) == 2
    assert "is not ready" in capsys.readouterr().err


# ---- models, health, metrics ---------------------------------------------------------------------------------


def test_models_health_and_metrics(main):
    client = main.client(KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "maven-edge"
    health = httpx.get(main.url + "/health", trust_env=False).json()
    assert health["status"] == "ready" and health["model"] == "tiny"
    client.chat.completions.create(model="tiny", messages=[user("what color is the circle?",
                                                                data_uri(DEMO_IMAGES[0]))], max_tokens=3)
    text = httpx.get(main.url + "/metrics", trust_env=False).text
    assert re.search(r'maven_http_requests_total\{path="/v1/chat/completions",status="200"\} [1-9]', text)
    for stage in ("vision", "discrete", "h_eos", "selector", "prefill", "decode"):
        assert re.search(rf'maven_stage_seconds_count\{{stage="{stage}"\}} [1-9]', text), stage
    for name in ("maven_ttft_seconds_count", "maven_decode_tokens_per_second_count", "maven_queue_wait_seconds_count",
                 "maven_completion_tokens_total"):
        assert re.search(rf"^{name} [1-9]", text, re.M), name
    assert re.search(r"^maven_queue_depth 0\.0", text, re.M) and "maven_active_generations" in text
    assert re.search(r'maven_pipeline_cache\{part="visual_cache",stat="misses"\} [1-9]', text)

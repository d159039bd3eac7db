"""Serving, in-process parts: the chat template, the request schema, image URLs, admission control,
and the app's readiness and load failure (docs/serving.md). The real-server tests are in
tests/test_serving_e2e.py; the Ray Serve test in tests/test_serving_ray.py (opt-in)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
from PIL import Image
from serving_helpers import DEMO, SAMPLES, ServerProcess, data_uri, user

from maven_edge.core.errors import ImageError, InputError, PromptError
from maven_edge.core.preprocess import ImageLimits
from maven_edge.model_src.data.tasks import make_prompt
from maven_edge.serving import images as image_urls
from maven_edge.serving.admission import Admission, Overloaded
from maven_edge.serving.images import SERVER_FORMATS, ImagePolicy
from maven_edge.serving.protocol import APIError, parse_request
from maven_edge.serving.template import render


def _render(*messages):
    return render(parse_request({"model": "m", "messages": list(messages)}).messages)


# ---- the chat template ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("text", ["which image has a red square?", "Describe the image.",
                                  "what changed between image 1 and image 2?"])
def test_single_turn_gives_the_training_prompt(n, text):
    """One user message with n images and a question or an instruction renders exactly as the
    training data's prompt (model_src/data/tasks.py make_prompt), whatever the parts' order."""
    urls = [f"data:image/png;base64,{k}" for k in range(n)]
    question = f"Question: {text}" if text.endswith("?") else text
    for text_first in (False, True):
        chat = _render(user(text, *urls, text_first=text_first))
        assert chat.prompt == make_prompt(n, question)
        assert chat.image_urls == tuple(urls)


def test_the_demo_prompt_is_reproduced():
    chat = _render(user(DEMO["prompt"].split("Question: ")[1].split("\n")[0], "a", "b", "c"))
    assert chat.prompt == DEMO["prompt"]


def test_multi_turn_keeps_earlier_images_and_numbers_them_in_order():
    chat = _render(
        {"role": "system", "content": "You answer briefly."},
        user("what color is the circle?", "u1"),
        {"role": "assistant", "content": "red"},
        user("Question: which image has a red square?", "u2", "u3"),
    )
    assert chat.prompt == ("You answer briefly.\nImage 1: <image>\nQuestion: what color is the circle?\nAnswer: red\n"
                           "Image 2: <image>\nImage 3: <image>\nQuestion: which image has a red square?\nAnswer:")
    assert chat.image_urls == ("u1", "u2", "u3")
    # follow-ups without new images: the training data's multi-turn layout (without <eos>)
    chat = _render(user("how many shapes are there?", "u1"), {"role": "assistant", "content": " 3 "},
                   {"role": "user", "content": "what color is the circle?"})
    assert chat.prompt == ("<image>\nQuestion: how many shapes are there?\nAnswer: 3\n"
                           "Question: what color is the circle?\nAnswer:")
    # consecutive user messages are one turn: images first, texts joined
    chat = _render(user("", "u1"), {"role": "user", "content": "which image is it?"}, user("", "u2"))
    assert chat.prompt == make_prompt(2, "Question: which image is it?")


def test_explicit_placeholders_are_used_verbatim():
    prompt = "Image 1: <image>\nImage 2: <image>\nQuestion: which image has a red square?\nAnswer:"
    chat = _render(user(prompt, "a", "b"))
    assert chat.prompt == prompt and chat.image_urls == ("a", "b")
    with pytest.raises(PromptError, match="2 <image> placeholder.*1 image"):
        _render(user(prompt, "a"))


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "hi"}, user("q?", "a")], "must start with a user"),
    ([user("q?", "a"), {"role": "assistant", "content": "x"}], "last message must be from the user"),
    ([user("q?", "a"), {"role": "system", "content": "late"}, user("q?")], "must come before"),
    ([user("", "a")], "no text"),
    ([user("q?"), {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}, user("q?")],
     "two assistant messages"),
])
def test_conversations_that_break_the_rules_are_refused(messages, match):
    with pytest.raises(PromptError, match=match):
        _render(*messages)


# ---- the request schema ------------------------------------------------------------------------------


def _error(body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(body)
    assert info.value.status == 400
    return info.value


def test_schema_refuses_what_it_does_not_run():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi?"}]}
    assert _error({**base, "logit_bias": {}}).param == "logit_bias"
    assert "unknown or unsupported parameter 'tools'" in _error({**base, "tools": []}).message
    assert _error({**base, "n": 2}).param == "n"
    assert _error({**base, "temperature": "0.5"}).param == "temperature"  # strict types
    assert _error({**base, "temperature": 3}).param == "temperature"
    assert _error({**base, "presence_penalty": 0.5}).param == "presence_penalty"
    assert _error({**base, "stop": ["a", "b", "c", "d", "e"]}).param == "stop"
    assert _error({**base, "max_tokens": 4, "max_completion_tokens": 5}).message
    assert _error({"messages": base["messages"]}).code == "missing_required_parameter"
    bad_part = {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]}
    assert _error(bad_part).param == "messages[0].content[0]"
    bad_url = {"model": "m", "messages": [user("q?", "x")]}
    bad_url["messages"][0]["content"][0]["image_url"]["colour"] = 1
    assert _error(bad_url).param == "messages[0].content[0].image_url.colour"
    assert _error(b"{not json").code == "invalid_json"
    assert "JSON object" in _error(b"[1, 2]").message
    ok = parse_request({**base, "max_completion_tokens": 5, "stop": "x", "presence_penalty": 0, "logprobs": False,
                        "stream": True, "stream_options": {"include_usage": True}})
    assert ok.token_limit == 5 and ok.stop_list == ["x"]


# ---- image URLs ----------------------------------------------------------------------------------------


def test_data_uris_local_paths_and_remote_refusal(tmp_path):
    policy = ImagePolicy(limits=ImageLimits(formats=SERVER_FORMATS, max_pixels=10_000))
    im = image_urls.load_url(data_uri(SAMPLES / "demo_1.png"), 1, policy)
    assert im.mode == "RGB" and im.size == Image.open(SAMPLES / "demo_1.png").size
    webp = data_uri(_encoded(Image.new("RGB", (20, 20), "red"), "WEBP"), "image/webp")
    assert image_urls.load_url(webp, 1, policy).getpixel((5, 5))[0] > 200
    with pytest.raises(ImageError, match="image 2: the data URI's payload is not valid base64"):
        image_urls.load_url("data:image/png;base64,@@@@", 2, policy)
    with pytest.raises(ImageError, match="unsupported media type 'image/gif'"):
        image_urls.load_url("data:image/gif;base64,R0lGOD", 1, policy)
    gif_as_png = data_uri(_encoded(Image.new("P", (4, 4)), "GIF"))
    with pytest.raises(ImageError, match="image 1 is not a supported image"):
        image_urls.load_url(gif_as_png, 1, policy)
    with pytest.raises(ImageError, match="too large"):
        image_urls.load_url(data_uri(Image.new("RGB", (200, 200))), 1, policy)
    with pytest.raises(InputError, match="--allow-remote-images"):
        image_urls.load_url("https://example.com/a.png", 1, policy)
    with pytest.raises(InputError, match="--allow-local-images"):
        image_urls.load_url(str(SAMPLES / "demo_1.png"), 1, policy)
    with pytest.raises(InputError, match="unsupported URL scheme"):
        image_urls.load_url("ftp://example.com/a.png", 1, policy)
    # --allow-local-images DIR: inside only, symlinks and .. resolved
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.png").write_bytes((SAMPLES / "demo_1.png").read_bytes())
    (tmp_path / "secret.png").write_bytes((SAMPLES / "demo_2.png").read_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    local = ImagePolicy(limits=policy.limits, local_root=root)
    for url in ("a.png", str(root / "a.png"), f"file://{root / 'a.png'}"):
        assert image_urls.load_url(url, 1, local).size == (64, 64)
    for url in ("../secret.png", str(tmp_path / "secret.png"), "link.png", f"file://{tmp_path / 'secret.png'}"):
        with pytest.raises(InputError, match="outside the directory"):
            image_urls.load_url(url, 1, local)


def _encoded(im: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


# ---- admission control ------------------------------------------------------------------------------------


def test_admission_bounds_concurrency_and_queue_and_serves_in_order():
    async def scenario():
        adm = Admission(max_concurrency=1, max_queue=2)
        assert await adm.acquire(1.0) == 0.0  # a free slot
        order = []

        async def waiter(name):
            await adm.acquire(5.0)
            order.append(name)

        first = asyncio.ensure_future(waiter("first"))
        second = asyncio.ensure_future(waiter("second"))
        await asyncio.sleep(0.01)
        assert adm.waiting == 2
        with pytest.raises(Overloaded) as info:
            await adm.acquire(1.0)
        assert info.value.retry_after_s >= 1
        adm.release(0.5)  # the slot goes to the first waiter, not back to the pool
        await first
        assert order == ["first"] and adm.active == 1
        adm.release(0.5)
        await second
        assert order == ["first", "second"] and adm.active == 1
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # a waiter that times out leaves the queue
            await adm.acquire(0.05)
        assert adm.waiting == 0
        adm.release()
        assert adm.active == 0

    asyncio.run(scenario())


# ---- readiness, load failure, the exposure warning ------------------------------------------------------------


@pytest.fixture(scope="module")
def test_artifacts(pytestconfig) -> Path:
    from tools import soak

    return soak.cached_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")))


def test_health_is_ready_only_after_loading(test_artifacts, monkeypatch):
    from fastapi.testclient import TestClient

    from maven_edge.runtime.options import PipelineOptions
    from maven_edge.serving import app as app_module
    from maven_edge.serving.config import ServerConfig

    gate = threading.Event()
    real_open = app_module.open_server_pipeline

    def slow_open(config):
        assert gate.wait(30)
        return real_open(config)

    monkeypatch.setattr(app_module, "open_server_pipeline", slow_open)
    app = app_module.create_app(ServerConfig(pipeline=PipelineOptions(artifacts=test_artifacts, threads=1)))
    body = {"model": "tiny", "messages": [user("what color is the circle?", data_uri(SAMPLES / "demo_1.png"))],
            "max_tokens": 2}
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = client.post("/v1/chat/completions", json=body)
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        assert early.headers["retry-after"]
        gate.set()
        for _ in range(300):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.1)
        assert client.get("/health").json()["status"] == "ready"
        res = client.post("/v1/chat/completions", json=body)
        assert res.status_code == 200, res.text
        assert res.json()["usage"]["completion_tokens"] == 2
        metrics = client.get("/metrics").text
        assert 'maven_http_requests_total{path="/v1/chat/completions",status="503"} 1.0' in metrics
        assert "maven_model_ready 1.0" in metrics


def test_a_model_that_fails_to_load_stops_the_server(tmp_path, test_artifacts):
    """A broken export: the port opens, /health reports the failure, the process exits with 2."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((test_artifacts / "manifest.json").read_bytes())
    server = ServerProcess(["--artifacts", str(broken)], tmp_path / "server.log", exit_after_s=120)
    try:
        server.start(timeout_s=120, wait_ready=False)
        assert server.proc.wait(timeout=120) == 2
    finally:
        server.stop()
    assert "maven-edge serve: error:" in server.log()


def test_cli_refuses_missing_artifacts_at_once(tmp_path, capsys):
    from maven_edge.cli import main

    assert main(["serve", "--artifacts", str(tmp_path)]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_binding_beyond_loopback_without_a_key_warns(caplog):
    from maven_edge.runtime.options import PipelineOptions
    from maven_edge.serving.config import ServerConfig
    from maven_edge.serving.server import is_loopback, warn_if_exposed

    cfg = ServerConfig(pipeline=PipelineOptions(artifacts="x"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="maven_edge.serving"):
        warn_if_exposed("127.0.0.1", cfg)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", cfg)
        assert "without an API key" in caplog.text
        caplog.clear()
        warn_if_exposed("0.0.0.0", ServerConfig(pipeline=PipelineOptions(artifacts="x"), api_key="k"))
        assert not caplog.records



def test_the_servers_h_eos_default_and_a_requests_own(test_artifacts):
    """`serve --h-eos context` reads h_eos in the prefill unless a request says otherwise."""
    import json

    from maven_edge.runtime.options import PipelineOptions
    from maven_edge.runtime.pipeline import MavenPipeline
    from maven_edge.serving.app import _options
    from maven_edge.serving.config import ServerConfig

    with pytest.raises(InputError, match="h_eos"):
        ServerConfig(pipeline=PipelineOptions(artifacts=test_artifacts), h_eos="inline")
    pipe = MavenPipeline.from_artifacts(test_artifacts)
    prompt = "Image 1: <image>\nQuestion: what color is the circle?\nAnswer:"
    for body, default, want in (({}, "context", "context"), ({}, "separate", "separate"),
                                ({"h_eos": "separate"}, "context", "separate")):
        req = parse_request(json.dumps({"model": "tiny", "messages": [user("q")], **body}).encode())
        assert _options(req, pipe, prompt, 1, 8, default).h_eos == want

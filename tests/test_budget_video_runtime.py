"""The visual-token budget and video questions through the ONNX Runtime pipeline and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maven_edge.core.errors import InputError, VideoError
from maven_edge.core.preprocess import preprocess_images
from maven_edge.core.sampling import GenerationConfig
from maven_edge.model_src.resources import samples_dir
from maven_edge.runtime.options import NO_CACHING, CachingOptions
from maven_edge.runtime.pipeline import MavenPipeline


@pytest.fixture(scope="module")
def model():
    from tools.soak import build_test_model

    return build_test_model()


@pytest.fixture(scope="module")
def ort_pipe(pytestconfig, model):
    from maven_edge.runtime.backends.ort_backend import OrtBackend
    from tools.soak import cached_test_artifacts

    art = cached_test_artifacts(pytestconfig.cache.mkdir("maven-runtime-artifacts"), model)
    return MavenPipeline(OrtBackend(art, session_options={"intra_op_num_threads": 1}), caching=NO_CACHING)


def _demo() -> tuple[list[str], str]:
    demo = json.loads((samples_dir() / "demo.json").read_text())
    return [str(samples_dir() / n) for n in demo["images"]], demo["prompt"]


@pytest.mark.parametrize("budget", [99, 120, 150, 400])
def test_budget_in_the_pipeline_equals_the_torch_reference(ort_pipe, model, budget):
    images, prompt = _demo()
    res = ort_pipe.generate(images, prompt, max_new_tokens=8, visual_token_budget=budget)
    codes = model.config.discrete.num_codes
    assert sum(res.visual_tokens_per_image) <= budget
    assert all(t >= codes + 1 for t in res.visual_tokens_per_image)
    text_ids = len(model.tokenizer.encode_prompt(prompt)) - len(images)
    assert res.prompt_tokens == text_ids + sum(t + 2 for t in res.visual_tokens_per_image)
    px = torch.from_numpy(preprocess_images(images, model.config.preprocess))
    want, _ = model.generate(px, prompt, GenerationConfig(max_new_tokens=8), visual_token_budget=budget)
    assert res.token_ids == want
    assert [len(i) for i in res.selected_indices] == [t - codes for t in res.visual_tokens_per_image]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.integers(0, 140), min_patches=st.integers(1, 5))
def test_the_prompt_never_exceeds_the_budget(ort_pipe, extra, min_patches):
    images, prompt = _demo()
    budget = 3 * (32 + min_patches) + extra  # from the least it can hold up
    res = ort_pipe.generate(images, prompt, max_new_tokens=1, visual_token_budget=budget, min_patches=min_patches)
    assert sum(res.visual_tokens_per_image) <= budget
    assert min(len(i) for i in res.selected_indices) >= min_patches


def test_budget_refusals(ort_pipe):
    images, prompt = _demo()
    with pytest.raises(InputError, match="cannot hold 3 image"):
        ort_pipe.generate(images, prompt, visual_token_budget=50)
    with pytest.raises(InputError, match="only hybrid"):
        ort_pipe.generate(images, prompt, visual_token_budget=150, mode="continuous")


def test_budget_with_caches_gives_the_same_tokens(ort_pipe):
    images, prompt = _demo()
    cached = MavenPipeline(ort_pipe.backend, caching=CachingOptions(visual_cache_mb=8, prefix_cache_mb=8, max_batch=1))
    want = ort_pipe.generate(images, prompt, max_new_tokens=8, visual_token_budget=130).token_ids
    for _ in range(2):
        assert cached.generate(images, prompt, max_new_tokens=8, visual_token_budget=130).token_ids == want
    # the same images without a budget are other visual sequences: no false prefix hit
    plain = ort_pipe.generate(images, prompt, max_new_tokens=8).token_ids
    assert cached.generate(images, prompt, max_new_tokens=8).token_ids == plain


# ---- video ----------------------------------------------------------------------------------------


def test_a_video_question_runs_through_the_pipeline(ort_pipe, model):
    pytest.importorskip("av")
    video = ort_pipe.load_video(samples_dir() / "demo_video.mp4", "what happened to the red circle?", max_frames=6)
    assert 1 <= len(video.frames) <= 6 and video.prompt.startswith("Frame 1: <image>\n")
    assert video.prompt.endswith("Question: what happened to the red circle?\nAnswer:")
    res = ort_pipe.generate(video.frames, video.prompt, max_new_tokens=6)
    px = torch.from_numpy(preprocess_images(video.frames, model.config.preprocess))
    want, _ = model.generate(px, video.prompt, GenerationConfig(max_new_tokens=6))
    assert res.token_ids == want and video.metadata["frames"] == len(video.frames)


def test_video_refusals_are_one_line(ort_pipe, tmp_path):
    pytest.importorskip("av")
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(VideoError):
        ort_pipe.load_video(bad, "what happened?")
    with pytest.raises(VideoError, match="frames"):  # more frames than the context holds
        ort_pipe.load_video(samples_dir() / "demo_video.mp4", "what happened?", max_frames=60)
    with pytest.raises(InputError, match="question"):
        ort_pipe.load_video(samples_dir() / "demo_video.mp4", "  ")


def test_generate_video_on_the_command_line(ort_pipe, capsys):
    pytest.importorskip("av")
    from maven_edge.cli import main

    art = str(ort_pipe.backend.artifacts)
    video = str(samples_dir() / "demo_video.webm")
    assert main(["generate", "--artifacts", art, "--video", video, "--prompt", "what happened to the red circle?",
                 "--max-frames", "4", "--max-new-tokens", "4", "--json", "--compact", "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["video"]["frames"] == len(d["visual_tokens_per_image"]) <= 4 and d["video"]["codec"] == "vp9"
    assert main(["generate", "--artifacts", art, "--video", video, "--prompt", "<image> what?"]) == 2
    assert "leave out <image>" in capsys.readouterr().err
    assert main(["generate", "--artifacts", art, "--video", video, "--image", video, "--prompt", "what?"]) == 2
    assert np.isfinite(len(d["token_ids"]))

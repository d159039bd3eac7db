"""The runtime: MavenPipeline over torch and onnxruntime, streaming, limits, cancellation, threads, CLI.

The ONNX artifacts of a small seeded random model (tiny geometry, fewer layers, so the export
stays quick) are exported once and kept in pytest's cache directory between runs
(``pytest --cache-clear`` rebuilds them). Until the trained tiny checkpoint ships, random
weights are what the cross-backend checks compare; they compare token ids, which is what must
be identical. Measured checks (edge-small speed, cache cost, memory over 200 generations) are
in ``python -m tools.perf_check`` and in the opt-in ``MAVEN_SLOW=1`` tests at the end.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from maven_edge.core.errors import (
    BackendError,
    GenerationCancelled,
    ImageError,
    InputError,
    MavenError,
    PromptError,
)
from tools import soak

SAMPLES = Path(__file__).resolve().parent.parent / "model_src" / "samples"
DEMO = json.loads((SAMPLES / "demo.json").read_text())
DEMO_IMAGES = [str(SAMPLES / n) for n in DEMO["images"]]
DEMO_PROMPT = DEMO["prompt"]


# One test model and one cached export for every test module (tools/soak.py).
build_test_model = soak.build_test_model
export_test_artifacts = soak.cached_test_artifacts


@pytest.fixture(scope="session")
def test_model():
    return build_test_model()


@pytest.fixture(scope="session")
def artifacts(pytestconfig, test_model) -> Path:
    return export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")), test_model)


@pytest.fixture(scope="session")
def ort_pipe(artifacts):
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline.from_artifacts(artifacts, providers=["cpu"],
                                        session_options=SessionConfig(intra_op_num_threads=1))


@pytest.fixture(scope="session")
def torch_pipe(test_model):
    from maven_edge.runtime.pipeline import MavenPipeline

    return MavenPipeline.from_model(test_model)


def _questions(n: int = 4):
    from maven_edge.model_src.data import get_sample

    picks = [0, 1, 5, 3, 4, 2][:n]  # 1-image questions and a 7-image one (index 5; 4 images before issue 36)
    return [(s.images, s.prompt) for s in (get_sample("test", i) for i in picks)]


# ---- cross-backend parity ------------------------------------------------------------------------


def test_ort_greedy_tokens_equal_torch(ort_pipe, torch_pipe, test_model):
    import torch

    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.core.sampling import GenerationConfig

    for images, prompt in _questions():
        a = torch_pipe.generate(images, prompt, max_new_tokens=10)
        b = ort_pipe.generate(images, prompt, max_new_tokens=10)
        assert b.token_ids == a.token_ids, prompt
        assert b.text == a.text
        assert b.selected_indices == a.selected_indices
        assert b.visual_tokens_per_image == a.visual_tokens_per_image == [32 + 16] * len(images)
    # ... and the torch backend is the reference model's own generate().
    images, prompt = _questions(3)[2]
    pv = torch.from_numpy(preprocess_images(images, test_model.config.preprocess))
    ids, text = test_model.generate(pv, prompt, GenerationConfig(max_new_tokens=10))
    assert torch_pipe.generate(images, prompt, max_new_tokens=10).token_ids == ids


def test_image_slots_are_added_the_same_way_everywhere(pytestconfig, monkeypatch):
    """A test model with `image_slots` (and a projector `output_scale`): every backend's assembled
    prompt equals the reference `assemble_batch` (slot k on the k-th image, the scaled projected
    patches), and the slots do change it."""
    import torch

    from maven_edge.core.config import get_config
    from maven_edge.core.preprocess import preprocess_images
    from maven_edge.export.onnx_components import OnnxComponents
    from maven_edge.model_src.checkpoint import build_model
    from maven_edge.runtime.pipeline import MavenPipeline

    model = build_model(get_config(soak.TEST_PRESET, [*soak.TEST_OVERRIDES, "image_slots=true",
                                                                      "projector.output_scale=0.05"]),
                        seed=soak.TEST_SEED)
    artifacts = export_test_artifacts(Path(pytestconfig.cache.mkdir("maven-runtime-artifacts")), model)
    images, prompt = _questions(3)[2]  # a multi-image question (7 images)
    assert len(images) >= 4
    seen = {}
    for name, pipe in (("ort", MavenPipeline.from_artifacts(artifacts, providers=["cpu"])),
                       ("torch", MavenPipeline.from_model(model))):
        assert pipe.config.image_slots
        orig = pipe.backend.prefill

        def capture(embeds, capacity, _orig=orig, _name=name):
            seen[_name] = np.array(embeds)
            return _orig(embeds, capacity)

        monkeypatch.setattr(pipe.backend, "prefill", capture)
        pipe.generate(images, prompt, max_new_tokens=1)
    pv = torch.from_numpy(preprocess_images(images, model.config.preprocess))
    with torch.no_grad():
        vis = model.encode_images(pv).embeds
        ids = model.tokenizer.encode_prompt(prompt)
        ref = model.assemble_batch([ids], [vis]).inputs_embeds.numpy()
        model.config.image_slots = False
        without = model.assemble_batch([ids], [vis]).inputs_embeds.numpy()
        model.config.image_slots = True
    np.testing.assert_allclose(seen["torch"], ref, atol=1e-6)
    np.testing.assert_allclose(seen["ort"], ref, atol=1e-4)
    assert np.abs(ref - without).max() > 1e-3
    # the manifest-only reader (maven_edge.export.validate) applies them too
    assert OnnxComponents(artifacts).generate(pv.numpy(), prompt) == model.generate(pv, prompt)[0]
    # more images than slots is refused before anything runs, even when the limits would allow it
    from maven_edge.runtime.options import PipelineLimits

    n = model.config.max_images + 1
    wide = MavenPipeline.from_model(model, PipelineLimits(max_images=n))
    with pytest.raises(InputError, match="image slots for 8"):
        wide.generate([images[0]] * n, "<image>" * n + "\nQuestion: which?\nAnswer:", max_new_tokens=1)


@pytest.mark.parametrize("opts", [{"mode": "discrete"}, {"mode": "continuous"}, {"keep_ratio": 0.5},
                                  {"keep_ratio": 0.05}])
def test_modes_and_keep_ratio_match(ort_pipe, torch_pipe, opts):
    a = torch_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=6, **opts)
    b = ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=6, **opts)
    assert b.token_ids == a.token_ids
    assert b.visual_tokens_per_image == a.visual_tokens_per_image
    assert b.selected_indices == a.selected_indices
    cfg = ort_pipe.config
    assert b.visual_tokens_per_image[0] == cfg.visual_tokens_per_image(opts.get("mode", "hybrid"),
                                                                      opts.get("keep_ratio"))


def test_seeded_sampling_identical_across_backends(ort_pipe, torch_pipe):
    opts = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 40, "top_p": 0.95}
    images, prompt = _questions(1)[0]
    a = torch_pipe.generate(images, prompt, seed=7, **opts)
    b = ort_pipe.generate(images, prompt, seed=7, **opts)
    c = ort_pipe.generate(images, prompt, seed=7, **opts)
    assert a.token_ids == b.token_ids == c.token_ids
    others = {tuple(ort_pipe.generate(images, prompt, seed=s, **opts).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(b.token_ids)}) > 1  # the seed matters


# ---- results, streaming, timings -------------------------------------------------------------


def test_stream_pieces_join_to_text(ort_pipe):
    stream = ort_pipe.stream(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=12, temperature=1.0, seed=3)
    pieces = list(stream)
    res = stream.result
    assert res is not None and "".join(pieces) == res.text
    assert res.text == ort_pipe.tokenizer.decode(res.token_ids)
    again = ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=12, temperature=1.0, seed=3)
    assert again.token_ids == res.token_ids and again.text == res.text


def test_stop_strings_and_stop_tokens(ort_pipe):
    base = ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=12, temperature=1.0, seed=3)
    assert len(base.text) > 4
    stop = base.text[2:4]
    cut = base.text.find(stop)
    stream = ort_pipe.stream(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=12, temperature=1.0, seed=3, stop=[stop])
    pieces = list(stream)
    res = stream.result
    assert res.finish_reason == "stop_string" and res.text == base.text[:cut] == "".join(pieces)
    assert stop not in "".join(pieces)
    tid = base.token_ids[3]
    res = ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=12, temperature=1.0, seed=3,
                            stop_token_ids=[tid])
    assert res.finish_reason == "stop_token" and res.token_ids == base.token_ids[: base.token_ids.index(tid)]


def test_detokenizer_emits_only_complete_characters(ort_pipe):
    from maven_edge.core.sampling import GenerationConfig, StopChecker
    from maven_edge.runtime.pipeline import _Detokenizer

    tok = ort_pipe.tokenizer
    text = "héllo wörld € 😀 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # byte-level pieces split multi-byte characters
    detok = _Detokenizer(tok, StopChecker(GenerationConfig(), tok.eos_id))
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # A stop string is never emitted, even partly, and its prefix is held back until it can't match.
    detok = _Detokenizer(tok, StopChecker(GenerationConfig(stop_strings=("wörld",)), tok.eos_id))
    out = "".join(detok.add(i) for i in ids) + detok.finish()
    assert out == "héllo " and detok.stopped


def test_timings_add_up(ort_pipe):
    from maven_edge.runtime.options import CachingOptions
    from maven_edge.runtime.pipeline import MavenPipeline

    uncached = MavenPipeline(ort_pipe.backend, caching=CachingOptions(visual_cache_mb=0, prefix_cache_mb=0, max_batch=1))
    uncached.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=4)  # warm
    res = uncached.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8)
    t = res.timings
    assert all(v >= 0 for v in t.stages().values())
    for stage in ("preprocess", "vision", "discrete", "h_eos", "selector", "prefill", "decode"):
        assert t.stages()[stage] > 0, stage
    assert t.stages_sum_ms == pytest.approx(t.total_ms, rel=0.05)
    assert 0 < t.ttft_ms < t.total_ms
    assert t.decode_tokens_per_s > 0 and len(t.decode_step_ms) == len(res.token_ids) - 1
    # one sampling time per generated token, in order, the first at the TTFT, none after the end
    assert len(t.token_ms) == len(res.token_ids) and t.token_ms == sorted(t.token_ms)
    assert t.token_ms[0] == pytest.approx(t.ttft_ms, abs=1.0) and t.token_ms[-1] <= t.total_ms
    d = res.to_dict()
    assert {"text", "token_ids", "timings", "visual_tokens_per_image", "selected_indices"} <= set(d)
    gaps = np.diff(t.token_ms)
    assert d["timings"]["inter_token_p95_ms"] == pytest.approx(float(np.percentile(gaps, 95)))
    assert 0 < d["timings"]["inter_token_p50_ms"] <= d["timings"]["inter_token_p95_ms"]
    assert "token_ms" not in d["timings"]
    json.dumps(d)


def test_image_kinds(ort_pipe):
    from PIL import Image

    path = DEMO_IMAGES[0]
    pil = Image.open(path)
    kinds = [path, Path(path), Path(path).read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    outs = {tuple(ort_pipe.generate(im, "<image>\nQuestion: what color?\nAnswer:", max_new_tokens=4).token_ids)
            for im in kinds}
    assert len(outs) == 1


def test_text_only_prompt(ort_pipe, torch_pipe):
    a = ort_pipe.generate([], "Question: what is a circle?\nAnswer:", max_new_tokens=5)
    assert a.token_ids == torch_pipe.generate(None, "Question: what is a circle?\nAnswer:", max_new_tokens=5).token_ids
    assert a.visual_tokens_per_image == []


# ---- errors and limits ---------------------------------------------------------------------------


class _CountingBackend:
    """Wraps a backend and counts stage calls (to prove a request was refused before running)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("vision", "discrete", "embed", "hidden_states", "select", "project", "prefill", "decode"):
            def counted(*a, **k):
                self.calls += 1
                return attr(*a, **k)
            return counted
        return attr


def test_refusals_happen_before_any_model_runs(ort_pipe):
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    be = _CountingBackend(ort_pipe.backend)
    pipe = MavenPipeline(be, PipelineLimits(max_images=3))  # type: ignore[arg-type]
    limit = pipe.config.llm.max_position_embeddings
    with pytest.raises(PromptError, match=rf"over the context limit of {limit}") as exc:
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT + " word" * limit, max_new_tokens=4)
    assert "tokens" in str(exc.value)
    with pytest.raises(PromptError, match="new tokens"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=limit)
    with pytest.raises(PromptError, match="2 <image> placeholder.*3 image"):
        pipe.generate(DEMO_IMAGES, "<image><image>\nQuestion: x?\nAnswer:")
    with pytest.raises(PromptError, match="0 <image>"):
        pipe.generate(DEMO_IMAGES[:1], "what is this?")
    with pytest.raises(InputError, match="4 images exceed the limit of 3"):
        pipe.generate(DEMO_IMAGES + DEMO_IMAGES[:1], "<image>" * 4)
    with pytest.raises(InputError, match="keep_ratio"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, keep_ratio=1.5)
    with pytest.raises(InputError, match="unknown mode"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, mode="fancy")
    with pytest.raises(InputError, match="unknown generation option"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_tokens=3)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        pipe.generate(DEMO_IMAGES, DEMO_PROMPT, top_p=0.0, temperature=1.0)
    with pytest.raises(PromptError, match="UTF-8"):
        pipe.generate([], b"\xff\xfe bad")
    with pytest.raises(PromptError, match="must be a str"):
        pipe.generate([], 42)
    assert be.calls == 0


def test_bad_images_are_image_errors(ort_pipe, tmp_path):
    from maven_edge.core.preprocess import ImageLimits
    from maven_edge.runtime.options import PipelineLimits
    from maven_edge.runtime.pipeline import MavenPipeline

    p = "<image>\nQuestion: what color?\nAnswer:"
    for bad in (b"", b"not an image", Path(DEMO_IMAGES[0]).read_bytes()[:100], tmp_path / "missing.png"):
        with pytest.raises(ImageError):
            ort_pipe.generate(bad, p, max_new_tokens=2)
    small = MavenPipeline(ort_pipe.backend, PipelineLimits(image=ImageLimits(max_pixels=32 * 32)))
    with pytest.raises(ImageError, match="pixel"):
        small.generate(DEMO_IMAGES[0], p, max_new_tokens=2)
    # still serves good requests afterwards
    assert ort_pipe.generate(DEMO_IMAGES[0], p, max_new_tokens=2).token_ids


def test_literal_special_tokens_are_text(ort_pipe):
    tok = ort_pipe.tokenizer
    res = ort_pipe.generate([], "<eos><img_start><eos_vis>", max_new_tokens=2)
    assert res.prompt_tokens == 1 + len(tok.encode("<eos><img_start><eos_vis>"))
    assert res.prompt_tokens > 4


def test_backend_errors(artifacts):
    from maven_edge.runtime.backends.providers import available_providers
    from maven_edge.runtime.pipeline import MavenPipeline, open_pipeline

    with pytest.raises(InputError, match="unknown backend"):
        open_pipeline(backend="tflite", artifacts=artifacts)
    with pytest.raises(InputError, match="--checkpoint"):
        open_pipeline(backend="torch", artifacts=artifacts)
    with pytest.raises(InputError, match="unknown pipeline option"):
        open_pipeline(artifacts=artifacts, thread=2)
    with pytest.raises(InputError, match="unknown execution provider"):
        MavenPipeline.from_artifacts(artifacts, providers=["npu"])
    for p in ("cuda", "tensorrt"):
        if p not in available_providers():
            with pytest.raises(BackendError, match=f"{p}.*not available"):
                MavenPipeline.from_artifacts(artifacts, providers=[p])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="TensorRT"):
            MavenPipeline.from_artifacts(artifacts, backend="trt")


def test_artifacts_are_verified(artifacts, tmp_path):
    import shutil

    from maven_edge.core.errors import ArtifactError
    from maven_edge.runtime.pipeline import MavenPipeline

    bad = tmp_path / "art"
    shutil.copytree(artifacts, bad)
    with open(bad / "embed_tokens.onnx", "r+b") as f:
        f.seek(-20, os.SEEK_END)
        byte = f.read(1)
        f.seek(-20, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="embed_tokens.onnx"):
        MavenPipeline.from_artifacts(bad)
    with pytest.raises(ArtifactError, match="manifest.json"):
        MavenPipeline.from_artifacts(tmp_path)


# ---- cancellation and threads ------------------------------------------------------------------


def test_cancellation_leaves_the_pipeline_usable(ort_pipe):
    base = ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8)
    ev = threading.Event()
    ev.set()
    with pytest.raises(GenerationCancelled) as exc:
        ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8, cancel=ev)
    assert exc.value.result.finish_reason == "cancelled"
    # cancel mid-decode from the consumer's side
    ev = threading.Event()
    stream = ort_pipe.stream(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8, cancel=ev)
    got = [next(stream)]
    ev.set()
    with pytest.raises(GenerationCancelled) as exc:
        got.extend(stream)
    assert 1 <= len(exc.value.result.token_ids) < 8
    # the consumer closes the stream early
    stream = ort_pipe.stream(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8)
    next(stream)
    stream.close()
    with ort_pipe.stream(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8) as s:
        next(s)
    assert ort_pipe.generate(DEMO_IMAGES, DEMO_PROMPT, max_new_tokens=8).token_ids == base.token_ids


def test_threads_give_single_threaded_answers(ort_pipe, torch_pipe):
    qs = _questions(3)
    requests = [(qs[i % 3], seed) for i, seed in enumerate((0, 1, 2, 3, 4, 5))]

    def run(pipe, req):
        (images, prompt), seed = req
        return pipe.generate(images, prompt, max_new_tokens=6, temperature=0.9, seed=seed).token_ids

    for pipe in (ort_pipe, torch_pipe):
        want = [run(pipe, r) for r in requests]
        got: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def worker(tid: int, pipe=pipe, got=got, errors=errors) -> None:
            try:
                for j in range(tid, len(requests), 3):
                    got[j] = run(pipe, requests[j])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors
        assert [got[j] for j in range(len(requests))] == want


def test_unsafe_backends_are_serialised(ort_pipe):
    """A backend that says thread_safe=False never sees two stage calls at once."""
    from maven_edge.runtime.pipeline import MavenPipeline

    class Unsafe(_CountingBackend):
        thread_safe = False

        def __init__(self, inner):
            super().__init__(inner)
            self.active, self.overlap = 0, False

        def __getattr__(self, name):
            attr = getattr(self.inner, name)
            if not callable(attr) or name in ("check_mode", "check_keep_ratio", "describe"):
                return attr

            def guarded(*a, **k):
                self.active += 1
                self.overlap |= self.active > 1
                try:
                    return attr(*a, **k)
                finally:
                    self.active -= 1
            return guarded

    be = Unsafe(ort_pipe.backend)
    pipe = MavenPipeline(be)  # type: ignore[arg-type]
    threads = [threading.Thread(target=pipe.generate, args=(DEMO_IMAGES, DEMO_PROMPT), kwargs={"max_new_tokens": 4})
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not be.overlap


# ---- KV cache ------------------------------------------------------------------------------------


def test_ort_kv_cache_stays_in_ortvalues(ort_pipe):
    import onnxruntime as ort

    be = ort_pipe.backend
    d = ort_pipe.config.llm.hidden_size
    logits, state = be.prefill(np.zeros((1, 5, d), np.float32), capacity=8)
    assert all(isinstance(v, ort.OrtValue) for v in state.past)
    first = state.past[0]
    be.decode(state, 3)
    assert state.length == 6 and state.past[0].shape()[2] == 6 and state.past[0] is not first
    assert logits.shape == (ort_pipe.config.vocab_size,)
    state.release()


# ---- GPU providers (real code, skipped here) --------------------------------------------------


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers_match_cpu(artifacts, ort_pipe, provider, tmp_path):
    from maven_edge.runtime.backends.ort_backend import SessionConfig
    from maven_edge.runtime.backends.providers import available_providers
    from maven_edge.runtime.pipeline import MavenPipeline

    if provider not in available_providers():
        pytest.skip(f"onnxruntime here has no {provider} execution provider (needs onnxruntime-gpu and a GPU)")
    pipe = MavenPipeline.from_artifacts(artifacts, providers=[provider],
                                        session_options=SessionConfig(trt_engine_cache_path=str(tmp_path)))
    assert pipe.backend.device.startswith("cuda")
    for images, prompt in _questions(2):
        assert pipe.generate(images, prompt, max_new_tokens=8).token_ids == ort_pipe.generate(
            images, prompt, max_new_tokens=8).token_ids


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_generate_json(artifacts, capsys):
    from maven_edge.cli import main

    args = ["generate", "--artifacts", str(artifacts), "--prompt", DEMO_PROMPT, "--max-new-tokens", "5", "--json"]
    for im in DEMO_IMAGES:
        args += ["--image", im]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "timings", "visual_tokens_per_image"} <= set(d)
    assert len(d["token_ids"]) <= 5 and d["visual_tokens_per_image"] == [48, 48, 48]
    assert {"ttft_ms", "decode_tokens_per_s", "total_ms", "prefill_ms"} <= set(d["timings"])
    # --stream with --json: pieces go to stderr, stdout stays one JSON object
    assert main(args + ["--stream", "--temperature", "0.7"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["text"].strip() == captured.err.strip()


def test_cli_errors_and_inspect(artifacts, capsys, tmp_path):
    from PIL import Image

    from maven_edge.cli import main

    assert main(["generate", "--artifacts", str(artifacts), "--image", DEMO_IMAGES[0], "--prompt", "no placeholder"]) == 2
    assert "placeholder" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--backend", "ort", "--prompt", "x"]) == 2
    assert "--artifacts" in capsys.readouterr().err
    out = tmp_path / "sel.png"
    assert main(["inspect", "--artifacts", str(artifacts), "--image", DEMO_IMAGES[0], "--image", DEMO_IMAGES[2],
                 "--out", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["selected_indices"]) == 2 and Image.open(out).size[0] > Image.open(out).size[1]


def test_demo_with_artifacts_and_missing_checkpoint(artifacts, capsys, tmp_path):
    from maven_edge.cli import main
    from maven_edge.runtime.commands import ensure_demo_artifacts

    assert main(["demo", "--artifacts", str(artifacts), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "timings (ms)" in out and "visual tokens per image: [48, 48, 48]" in out
    with pytest.raises(MavenError, match="checkpoint.*missing"):
        ensure_demo_artifacts(tmp_path / "art", tmp_path / "no-checkpoint")


# ---- opt-in measured checks -------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("MAVEN_SLOW"), reason="slow: set MAVEN_SLOW=1 (200 generations)")
def test_memory_is_stable_over_200_generations(ort_pipe):
    from tools.perf_check import rss_growth

    report = rss_growth(ort_pipe, DEMO_IMAGES, DEMO_PROMPT, n=200, max_new_tokens=8)
    assert report["growth_after_warmup_mb"] < 20, report

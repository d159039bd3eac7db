"""Shared fixtures: small seeded models and inputs, cheap enough for a 2-core CI machine.

- ``tiny_cfg``: a fresh ``tiny`` preset config (function scope: safe to mutate).
- ``tiny_model``: a seeded random ``tiny`` MavenModel, shared by the whole session; do not
  mutate it (build your own with ``build_model`` if a test changes weights or config).
- ``make_pixels(n, seed=0, cfg=None)``: random ``pixel_values`` [n, C, H, W] for a config
  (default: the tiny preset's geometry).
- ``reduced_paper_cfg`` / ``reduced_paper_cfg_factory(extra_overrides)``: the ``paper``
  preset's 336 px / 14 px geometry (576 patches) with narrow, shallow networks, for token-math
  tests that run a real forward pass.
- ``stage4_targets(samples, extra, count_head)``: stage 4's attention targets for a batch of
  samples (with follow-ups ``extra``, or none) on a fresh 3-layer tiny model, and what the checks
  need to read them (a ``SimpleNamespace``).
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the long tests marked slow (left out of the default suite)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped, with the reason shown, unless pytest runs with --runslow."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long-running: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Tests never write into the user's cache directory: default outputs (the demo's export, the
    bench cache) go under .pytest_cache/ unless MAVEN_EDGE_CACHE says otherwise.

    One intra-op thread per test process (override with MAVEN_TEST_THREADS): on a small shared
    CI machine, torch's default thread pool oversubscribes the cores and runs the tiny test
    models several times slower."""
    os.environ.setdefault("MAVEN_EDGE_CACHE", str(config.rootpath / ".pytest_cache" / "maven-edge-cache"))
    try:
        import torch
    except ImportError:  # torch-free environments (runtime-only checks)
        return
    torch.set_num_threads(int(os.environ.get("MAVEN_TEST_THREADS", "1")))


# Narrow widths, one layer each, paper geometry kept (336 px / 14 px -> 576 patches).
REDUCED_PAPER_OVERRIDES = [
    "vision.hidden_size=32",
    "vision.num_heads=2",
    "vision.num_layers=2",
    "vision.intermediate_size=32",
    "discrete.hidden_size=32",
    "discrete.num_heads=2",
    "discrete.num_layers=1",
    "discrete.intermediate_size=32",
    "discrete.codebook_size=64",
    "discrete.code_dim=16",
    "llm.hidden_size=32",
    "llm.num_layers=1",
    "llm.num_heads=2",
    "llm.num_kv_heads=1",
    "llm.intermediate_size=32",
    "llm.text_vocab_size=512",
    "selector.hidden_size=32",
]


@pytest.fixture
def tiny_cfg():
    from maven_edge.core.config import get_config

    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_model():
    from maven_edge.core.config import get_config
    from maven_edge.model_src.checkpoint import build_model

    return build_model(get_config("tiny"), seed=0)


@pytest.fixture(scope="session")
def reduced_paper_cfg_factory():
    from maven_edge.core.config import get_config

    return lambda extra=(): get_config("paper", REDUCED_PAPER_OVERRIDES + list(extra))


@pytest.fixture
def reduced_paper_cfg(reduced_paper_cfg_factory):
    return reduced_paper_cfg_factory()


@pytest.fixture(scope="session")
def make_pixels():
    import torch

    def make(n: int, seed: int = 0, cfg=None):
        from maven_edge.core.config import get_config

        v = (cfg or get_config("tiny")).vision
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, v.num_channels, v.image_size, v.image_size, generator=gen)

    return make


@pytest.fixture(scope="session")
def stage4_targets():
    def make(samples, extra=None, count_head=False):
        import types

        import numpy as np
        import torch

        from maven_edge.core.config import get_config
        from maven_edge.model_src.checkpoint import build_model
        from maven_edge.model_src.train import batches as B
        from maven_edge.model_src.train.attention_targets import (
            AttentionSupervision,
            answer_turns,
            build_targets,
        )
        from maven_edge.model_src.train.common import visual_features

        model = build_model(get_config("tiny", ["llm.num_layers=3", "vision.num_layers=1", "discrete.num_layers=1"]),
                            seed=0)
        tok = model.tokenizer
        tb = B.text_batch(samples, tok, extra)
        with torch.no_grad():
            vf = visual_features(model, B.pixel_tensor(samples, model.config), "hybrid")
        offsets = np.concatenate([[0], np.cumsum(tb.image_counts)])
        kept = [vf.indices[offsets[i]:offsets[i + 1]].numpy() for i in range(len(samples))]
        sup = AttentionSupervision.for_decoder(model.config.llm, 1.0, count_head=count_head)
        t_img = model.config.visual_tokens_per_image("hybrid") + 2
        codes = model.config.discrete.num_codes
        plus = tok.encode("+")[0]
        extra = extra if extra is not None else [[] for _ in samples]
        turns = [answer_turns(s, e, t) for s, e, t in zip(samples, extra, tb.targets, strict=True)]
        t = build_targets(sup, tb.sequences, turns, [s.scenes for s in samples], kept, tok.image_id, t_img, codes, 8,
                          tok.encode(":")[0], plus)
        return types.SimpleNamespace(tb=tb, kept=kept, sup=sup, turns=turns, t=t, tok=tok, t_img=t_img, codes=codes,
                                     plus=plus)

    return make

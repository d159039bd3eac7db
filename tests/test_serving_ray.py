"""`maven-edge serve --ray`: the same app as a Ray Serve deployment with 2 replicas (issue 32).

Opt-in (Ray starts a dozen processes and takes ~40 s to come up on a 2-core machine):

    pip install -c constraints.txt -e ".[dev,ray]"
    MAVEN_RAY=1 python -m pytest tests/test_serving_ray.py -q

Deploys 2 replicas locally on 127.0.0.1, sends 20 requests from 4 threads, checks every answer
against the same request run through the pipeline in this process, and that both replicas served
(the ``X-Maven-Replica`` header names the process that answered).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving_helpers import ServerProcess, data_uri, free_port, user

pytestmark = pytest.mark.skipif(not os.environ.get("MAVEN_RAY"), reason="opt-in: MAVEN_RAY=1 (needs maven-edge[ray])")


@pytest.fixture(scope="module")
def tiny_artifacts() -> Path:
    from maven_edge.model_src.resources import shipped_checkpoint
    from maven_edge.runtime.commands import demo_artifacts_dir, ensure_demo_artifacts

    return ensure_demo_artifacts(demo_artifacts_dir(), shipped_checkpoint(), log=lambda m: None)


@pytest.fixture(scope="module")
def ray_server(tiny_artifacts, tmp_path_factory):
    pytest.importorskip("ray.serve")
    server = ServerProcess(["--artifacts", str(tiny_artifacts), "--threads", "1", "--ray", "--replicas", "2",
                            "--max-concurrency", "2", "--max-queue", "16"],
                           tmp_path_factory.mktemp("ray") / "server.log", exit_after_s=600, port=free_port(),
                           env={"MAVEN_EDGE_API_KEY": "", "RAY_DEDUP_LOGS": "0"})
    try:
        server.start(timeout_s=300)
        yield server
    finally:
        assert server.stop() is not None


def test_two_replicas_serve_twenty_requests_from_four_threads(ray_server, tiny_artifacts):
    from maven_edge.model_src.data import get_sample
    from maven_edge.runtime.pipeline import open_pipeline

    samples = [get_sample("test", i) for i in range(20)]
    pipe = open_pipeline(artifacts=tiny_artifacts, threads=1)
    expected = [pipe.generate(s.images, s.prompt, max_new_tokens=12).text for s in samples]
    assert len(set(expected)) > 5

    def one(i: int) -> tuple[int, str, str]:
        s = samples[i]
        body = {"model": "tiny", "max_tokens": 12,
                "messages": [user(s.prompt, *(data_uri(im) for im in s.images), text_first=True)]}
        with httpx.Client(trust_env=False, timeout=120) as client:
            res = client.post(ray_server.url + "/v1/chat/completions", json=body)
        assert res.status_code == 200, res.text
        return i, res.json()["choices"][0]["message"]["content"], res.headers["x-maven-replica"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(20)))
    for i, text, _ in results:
        assert text == expected[i], (i, samples[i].prompt)
    served = Counter(replica for _, _, replica in results)
    assert len(served) == 2, served  # both replicas answered
    # the same API: models, health, streaming through Ray's proxy
    client = ray_server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    s = samples[5]
    chunks = list(client.chat.completions.create(
        model="tiny", max_tokens=12, stream=True,
        messages=[user(s.prompt, *(data_uri(im) for im in s.images), text_first=True)]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[5]
    assert httpx.get(ray_server.url + "/health", trust_env=False).json()["status"] == "ready"

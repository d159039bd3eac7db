"""tools.count_probe: per-image count questions built from the split's count-across questions."""

from __future__ import annotations

import re

import pytest

from tools import count_probe


def test_each_image_of_a_count_across_question_is_asked_its_own_count():
    from maven_edge.model_src.data.shapes import COLORS, SHAPES
    from maven_edge.model_src.data.tasks import plural, question_line

    questions, truth = count_probe.per_image_questions("test", 5, 8)
    assert len(questions) == len(truth) > 100 and set(truth) == {0, 1, 2}
    for q, count in zip(questions, truth, strict=True):
        m = re.fullmatch(r"Question: how many (.+) are there in image (\d)\?", question_line(q))
        assert m and 5 <= len(q.images) <= 8 and q.answer == str(count)
        noun, k = m.group(1), int(m.group(2))
        color = noun.removesuffix(" shapes") if noun.removesuffix(" shapes") in COLORS else None
        shape = None if color else {plural(s): s for s in SHAPES}[noun]
        assert len(q.scenes[k - 1].find(color=color, shape=shape)) == count
        assert q.prompt.count("<image>") == len(q.images)


def test_the_probe_scores_a_checkpoint(tmp_path):
    pytest.importorskip("torch")
    from maven_edge.model_src.checkpoint import save_checkpoint
    from tools.soak import build_test_model

    save_checkpoint(build_test_model(), tmp_path / "ckpt")
    report = count_probe.run(tmp_path / "ckpt", "test", 2, 2)
    assert report["questions"] == sum(int(v.split("/")[1]) for v in report["by_true_count"].values()) > 0
    assert 0 <= report["right"] <= report["questions"] and len(report["examples"]) == 5

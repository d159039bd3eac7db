"""The budget-curve report (`model_src.train.budget_curves`): the sign test, the verdict, the page it
writes (the command that re-makes it, the figures it states) and one small real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maven_edge.model_src.train import budget_curves as bc


def test_sign_test_is_the_exact_two_sided_binomial():
    assert bc.sign_test(0, 0) == 1.0
    assert bc.sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert bc.sign_test(3, 3) == 1.0
    # the figure docs/budget.md reported for 19 against 25
    assert bc.sign_test(19, 25) == pytest.approx(0.4514, abs=1e-4)
    assert bc.sign_test(19, 25) == bc.sign_test(25, 19)


def _row(images: int, k: int, method: str, accuracy: float, only_global: int = 0, only_per_image: int = 0) -> dict:
    return {"images": images, "patches_per_image": k, "budget": images * (32 + k), "method": method,
            "accuracy": accuracy, "task_accuracy": {}, "mean_visual_tokens": float(images * (32 + k)),
            "questions": 20, "only_global": only_global, "only_per_image": only_per_image}


def _result(rows: list[dict], threads: int | None = 2) -> dict:
    return {"checkpoint": "model_src/checkpoints/tiny", "per_count": 20, "threads": threads, "codes_per_image": 32,
            "default_visual_tokens_per_image": 48, "four_images_default_budget": 192,
            "eight_images_at_four_default": None, "rows": rows, "wall_time_s": 12.3}


def test_the_page_names_its_command_and_the_measured_figures(tmp_path: Path):
    rows = [_row(2, 1, "per_image", 0.5), _row(2, 16, "per_image", 0.95), _row(2, 16, "global", 0.9, 1, 2),
            _row(8, 1, "per_image", 0.3), _row(8, 16, "per_image", 0.8), _row(8, 16, "global", 0.85, 12, 0)]
    bc.write(_result(rows), tmp_path)
    md = (tmp_path / "budget.md").read_text()
    assert ("`MAVEN_TRAIN_THREADS=2 python -m maven_edge.model_src.train.budget_curves --checkpoint "
            "model_src/checkpoints/tiny --per-count 20 --out docs` (12 s wall time)") in md
    assert "| 8 | 16 | 384 | 80.0 % | 85.0 % | +5.0 | 12 / 0 |" in md
    assert "| 2 | 1 | 66 | 50.0 % | (same) | | |" in md
    # the verdict is the sign test's: 13 against 2, p < 0.05
    assert "**Which wins: global ranking wins.**" in md and "13 questions are answered right only with global" in md
    assert "the checkpoint answers: 2 images 95.0 %, 8 images 80.0 %." in md
    assert (tmp_path / "figures" / "budget.png").stat().st_size > 0
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["verdict"]["only_global"] == 13 and saved["verdict"]["only_per_image"] == 2

    # --from-json re-writes the same page from the JSON alone
    again = tmp_path / "again"
    assert bc.main(["--from-json", str(tmp_path / "budget.json"), "--out", str(again)]) == 0
    assert (again / "budget.md").read_text() == md


def test_a_result_without_recorded_threads_gives_the_plain_command(tmp_path: Path):
    rows = [_row(2, 1, "per_image", 0.5), _row(2, 2, "per_image", 0.5), _row(2, 2, "global", 0.5)]
    bc.write(_result(rows, threads=None), tmp_path)
    md = (tmp_path / "budget.md").read_text()
    assert "Made by `python -m maven_edge.model_src.train.budget_curves --checkpoint" in md
    assert "**Which wins: neither wins measurably" in md


def test_a_small_real_run_on_the_shipped_model(tmp_path: Path):
    """Four 2-image questions, k = 1 and 2: three evaluations of the shipped model, paired counts
    consistent with the per-question results, and the page written."""
    pytest.importorskip("torch")
    from maven_edge.model_src.resources import shipped_checkpoint

    result = bc.run(str(shipped_checkpoint()), tmp_path, per_count=4, image_counts=(2,), patches=(1, 2), quiet=True)
    rows = result["rows"]
    assert [(r["patches_per_image"], r["method"]) for r in rows] == [(1, "per_image"), (2, "per_image"), (2, "global")]
    assert all(r["questions"] == 4 and r["budget"] == 2 * (32 + r["patches_per_image"]) for r in rows)
    per, glob = rows[1], rows[2]
    assert glob["only_global"] == sum(g and not p for g, p in zip(glob["correct"], per["correct"], strict=True))
    assert glob["only_per_image"] == sum(p and not g for g, p in zip(glob["correct"], per["correct"], strict=True))
    assert result["threads"] >= 1
    assert "--per-count 4" in (tmp_path / "budget.md").read_text()

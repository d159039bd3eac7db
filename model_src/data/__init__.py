"""The seeded synthetic "shapes world" (docs/design.md §6): scenes, tasks, splits and selector labels.

    from maven_edge.model_src.data import get_sample, iter_samples
    s = get_sample("train", 0)          # Sample: images, prompt, answer, family, task, patch_labels
    for s in iter_samples("test", 100, families=["multi"]): ...

See ``docs/usage/data.md`` and the module docstrings of :mod:`.shapes` (scene conventions),
:mod:`.tasks` (prompt and answer formats), :mod:`.splits` (seeds, held-out pairs) and
:mod:`.labels` (patch labels).
"""

from maven_edge.model_src.data.labels import patch_labels, scene_patch_labels
from maven_edge.model_src.data.shapes import (
    ALL_PAIRS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SceneConfig,
    ShapeObject,
    render_scene,
    sample_scene,
)
from maven_edge.model_src.data.splits import (
    HELDOUT_PAIRS,
    SPLITS,
    DataConfig,
    get_sample,
    iter_samples,
    num_samples,
    split_pairs,
    summary,
    task_of,
    text_corpus,
    write_demo_samples,
    write_preview,
)
from maven_edge.model_src.data.tasks import FAMILIES, TASK_FAMILY, TASKS, Sample, TaskConfig, make_sample

__all__ = [
    "ALL_PAIRS",
    "COLORS",
    "FAMILIES",
    "HELDOUT_PAIRS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "TASK_FAMILY",
    "DataConfig",
    "Sample",
    "Scene",
    "SceneConfig",
    "ShapeObject",
    "TaskConfig",
    "get_sample",
    "iter_samples",
    "make_sample",
    "num_samples",
    "patch_labels",
    "render_scene",
    "sample_scene",
    "scene_patch_labels",
    "split_pairs",
    "summary",
    "task_of",
    "text_corpus",
    "write_demo_samples",
    "write_preview",
]

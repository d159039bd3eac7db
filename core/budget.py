"""The visual-token budget: which patches of a request's images to keep so its visual tokens fit.

Instead of one keep ratio per image (``k = floor(keep_ratio * N)`` patches of every image), the
selector's scores of *all* images of a request are ranked together and the best patches are kept
until the request's visual tokens reach the budget. Every image always keeps its discrete codes
(``codes_per_image`` tokens) and at least ``min_patches`` patches (its own best ones); within an
image the kept patches stay in raster order, as with a keep ratio. "Visual tokens" are the codes
plus the kept patches, as in :meth:`~maven_edge.core.config.MavenConfig.visual_tokens_per_image`
(the ``<img_start>`` / ``<img_end>`` markers, two per image, are not counted).

torch-free (numpy only): the torch reference (``MavenModel.encode_images``, the evaluation) and
the ONNX Runtime pipeline call the same function on the ``[n, N]`` selector scores.

    kept = select_under_budget(scores, budget=192, codes_per_image=32, min_patches=1)
    kept[i]  # int64 raster indices of image i's kept patches, ascending
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maven_edge.core.errors import InputError

__all__ = ["min_budget", "per_image_budget", "select_under_budget", "visual_tokens"]


def min_budget(num_images: int, codes_per_image: int, min_patches: int = 1) -> int:
    """The smallest budget ``num_images`` images fit in: their codes and ``min_patches`` each."""
    return num_images * (codes_per_image + min_patches)


def visual_tokens(kept: Sequence[np.ndarray], codes_per_image: int) -> int:
    """Visual tokens of a selection: codes plus kept patches over all images (markers excluded)."""
    return sum(codes_per_image + len(k) for k in kept)


def per_image_budget(num_images: int, codes_per_image: int, patches_per_image: int) -> int:
    """The budget a fixed per-image selection of ``patches_per_image`` patches uses."""
    return num_images * (codes_per_image + patches_per_image)


def select_under_budget(
    scores: np.ndarray, budget: int, codes_per_image: int, min_patches: int = 1
) -> list[np.ndarray]:
    """Kept patch indices per image (int64, ascending raster order) for selector ``scores``
    ``[n, N]`` of one request, so that ``n * codes_per_image`` plus the kept patches is at most
    ``budget``.

    Each image first keeps its ``min_patches`` best patches; the rest of the budget goes to the
    best remaining patches of all images, ranked together by score (ties: lower image, then lower
    patch index first, so the result is deterministic). A budget larger than all patches keeps
    them all. An :class:`~maven_edge.core.errors.InputError` when the budget cannot hold every
    image's codes and ``min_patches`` patches, or the inputs are malformed.
    """
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise InputError(f"selector scores must be [images, patches], got shape {arr.shape}")
    n, num_patches = arr.shape
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"selector scores must be numbers, got dtype {arr.dtype}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise InputError(f"the visual-token budget must be an integer, got {budget!r}")
    if codes_per_image < 0 or not 0 <= min_patches <= num_patches:
        raise InputError(f"need codes_per_image >= 0 and 0 <= min_patches <= {num_patches}, got "
                         f"{codes_per_image} and {min_patches}")
    if n == 0:
        return []
    if np.isnan(arr).any():
        raise InputError("selector scores contain NaN; the visual encoder's output is broken")
    need = min_budget(n, codes_per_image, min_patches)
    if budget < need:
        raise InputError(
            f"a visual-token budget of {budget} cannot hold {n} image(s): each keeps its {codes_per_image} "
            f"codes and at least {min_patches} patch(es), {need} tokens in all; raise the budget to >= {need} "
            "or send fewer images"
        )
    patches = min(int(budget) - n * codes_per_image, n * num_patches)
    # rank of every patch inside its image (0 = best), stable: ties keep the lower index first
    order = np.argsort(-arr, axis=1, kind="stable")
    keep = np.zeros((n, num_patches), dtype=bool)
    rows = np.arange(n)[:, None]
    keep[rows, order[:, :min_patches]] = True
    rest = patches - n * min_patches
    if rest > 0:
        flat = np.where(keep, -np.inf, arr.astype(np.float64)).reshape(-1)
        # stable sort of the negated scores: equal scores keep (image, patch) order
        best = np.argsort(-flat, kind="stable")[:rest]
        keep.reshape(-1)[best] = True
    return [np.flatnonzero(keep[i]).astype(np.int64) for i in range(n)]

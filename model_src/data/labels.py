"""Selector pseudo-labels: which ViT patches overlap the objects a sample's text names.

This plays the role Grounding-SAM masks play in the MaVEn paper. Patches are numbered in raster
order (row by row, left to right), matching the ViT's patch sequence: patch ``r * g + c`` covers
pixels ``[r*p:(r+1)*p, c*p:(c+1)*p]`` with ``p = patch_size`` and ``g = image_size // p``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maven_edge.model_src.data.shapes import Scene, ShapeObject


def patch_pixel_counts(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """int ``[(H // patch_size) ** 2]``: how many pixels of ``mask`` (bool ``[H, H]``) each patch
    holds, patches in raster order."""
    g = mask.shape[0] // patch_size
    return mask.reshape(g, patch_size, g, patch_size).sum(axis=(1, 3)).reshape(-1)


def patch_labels(masks: Sequence[np.ndarray], image_size: int, patch_size: int) -> np.ndarray:
    """float32 ``[(image_size // patch_size) ** 2]``: 1.0 where a patch holds any pixel of the union
    of ``masks`` (bool ``[image_size, image_size]`` each), else 0.0. No masks give all zeros."""
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a positive multiple of patch_size {patch_size}")
    union = np.zeros((image_size, image_size), dtype=bool)
    for m in masks:
        if m.shape != union.shape:
            raise ValueError(f"mask shape {m.shape} != ({image_size}, {image_size})")
        union |= m
    g = image_size // patch_size
    return union.reshape(g, patch_size, g, patch_size).any(axis=(1, 3)).reshape(-1).astype(np.float32)


def scene_patch_labels(scene: Scene, named: Sequence[ShapeObject] | None, patch_size: int) -> np.ndarray:
    """Labels for the ``named`` objects of ``scene``; all of its objects when ``named`` is None or
    empty (a text that names every object, or none that occurs in this image)."""
    objects = named if named else scene.objects
    return patch_labels([o.mask for o in objects], scene.image_size, patch_size)

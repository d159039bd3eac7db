"""The one exception hierarchy of maven-edge.

Every error a user can cause (bad input, bad files, bad options) is raised as a subclass of
:class:`MavenError` with a message that says what was wrong and what to do. The CLI prints
these without a traceback. This module imports nothing heavy so every package can use it.
"""

from __future__ import annotations


class MavenError(Exception):
    """Base class of every error maven-edge raises on purpose."""


class ConfigError(MavenError):
    """Unknown preset, bad override, or a config that does not fit the weights."""


class InputError(MavenError):
    """A request that cannot be served: wrong number of images, bad prompt, bad option."""


class ImageError(InputError):
    """An image that cannot be read, is too large, or has the wrong size or channels."""


class VideoError(InputError):
    """A video that cannot be read, is too large or too long, or gives more frames than fit."""


class PromptError(InputError):
    """A prompt that cannot be served (placeholder mismatch, context overflow, bad text)."""


class CheckpointError(MavenError):
    """A checkpoint directory that is missing files, is corrupt, or does not match its config."""


class ArtifactError(MavenError):
    """An exported artifact directory that is missing files, tampered with, or unsupported."""


class ExportError(MavenError):
    """Export refused or failed (overwrite without --force, opset too old, ...)."""


class BackendError(MavenError):
    """A backend or execution provider that is not available on this machine."""


class CalibrationError(MavenError):
    """A calibration set that is empty or does not match the artifacts."""


class TrainingError(MavenError):
    """Bad training input: unknown stage, missing previous stage, unusable data."""


class GenerationCancelled(MavenError):
    """A generation was stopped by its caller (stop event or closed stream)."""

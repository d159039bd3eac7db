"""Calibration data: real preprocessed samples, and the inputs each component sees for them.

A :class:`CalibrationSet` is a list of *samples*; each sample is the ``pixel_values`` of the
images one request would carry (``[n_i, 3, S, S]`` float32, preprocessed exactly as the runtime
preprocesses, with the artifacts' own preprocess config). Sources:

- the synthetic shapes-world splits (:func:`synthetic_calibration_set`, default: the
  validation split, never the test split the accuracy report is measured on);
- a user's folder of images (:func:`folder_calibration_set`);
- a saved set (``calibration.json`` + ``calibration.npz``, written by :meth:`CalibrationSet.save`
  or ``maven-edge calib-set``), e.g. prepared on a workstation and copied to a Jetson.

:func:`resolve_calibration_set` picks the source and :func:`check_calibration_set` refuses a set
that is empty, has the wrong image size, or does not match the artifacts (another preprocessing,
another preset, more images per sample than the model takes) with a :class:`CalibrationError`.

:class:`ComponentFeeds` turns a set into the inputs of every component by running the fp32
artifacts with onnxruntime, following the runtime flow of docs/design.md §5: pixel_values for the
vision encoder; its patch features for the discrete tokenizer and the projector; patch features
plus ``h_eos`` (the decoder's last hidden state after ``[codes, <eos_vis>]``) for the patch
selector; the ``[codes, <eos_vis>]`` pass itself for the decoder and embed_tokens.
:class:`FeedReader` serves one component's feeds to ``onnxruntime.quantization`` (it is a
``CalibrationDataReader``) and to the TensorRT INT8 calibrator.

torch-free: numpy, Pillow, onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maven_edge.core.config import PreprocessConfig
from maven_edge.core.errors import CalibrationError, ImageError, MavenError
from maven_edge.core.preprocess import load_image, preprocess_images
from maven_edge.export.onnx_components import OnnxComponents

CALIB_META = "calibration.json"
CALIB_ARRAYS = "calibration.npz"
CALIB_FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: Default split for calibration: validation (the accuracy report measures on test).
DEFAULT_SPLIT = "val"
#: Components whose inputs the calibration set provides, in runtime order.
FEED_COMPONENTS = ("vision_encoder", "discrete_tokenizer", "embed_tokens", "decoder", "patch_selector", "projector")


@dataclass
class CalibrationSet:
    """Preprocessed calibration samples (one ``[n_i, 3, S, S]`` array per sample)."""

    pixel_values: list[np.ndarray]
    preprocess: dict[str, Any]  # the PreprocessConfig (as a dict) the pixels were made with
    source: str  # "synthetic:val", "folder:/path", "saved:/path", "arrays"
    prompts: list[str] = field(default_factory=list)  # optional, one per sample
    preset: str | None = None  # the preset the set was prepared for (None: any with this preprocessing)
    names: list[list[str]] = field(default_factory=list)  # optional: image names per sample

    @property
    def num_samples(self) -> int:
        return len(self.pixel_values)

    @property
    def num_images(self) -> int:
        return int(sum(p.shape[0] for p in self.pixel_values))

    def digest(self) -> str:
        """sha256 over the preprocessing and every pixel: keys calibration caches."""
        h = hashlib.sha256(json.dumps(_jsonable(self.preprocess), sort_keys=True).encode())
        for arr in self.pixel_values:
            a = np.ascontiguousarray(arr, dtype=np.float32)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.num_samples, "images": self.num_images,
                "image_size": self.preprocess.get("image_size"), "preset": self.preset,
                "digest": self.digest()[:16]}

    def save(self, directory: str | Path) -> Path:
        """Write ``calibration.json`` + ``calibration.npz`` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(directory / CALIB_ARRAYS,
                            **{f"sample_{i:05d}": np.asarray(p, np.float32) for i, p in enumerate(self.pixel_values)})
        meta = {"format": CALIB_FORMAT, "kind": "maven-edge calibration set", "preprocess": _jsonable(self.preprocess),
                "preset": self.preset, "source": self.source, "prompts": self.prompts, "names": self.names,
                "samples": self.num_samples, "images": self.num_images, "digest": self.digest()}
        (directory / CALIB_META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationSet:
        directory = Path(directory)
        meta_path, arrays_path = directory / CALIB_META, directory / CALIB_ARRAYS
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"{directory} is not a saved calibration set: {CALIB_META} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != CALIB_FORMAT or "preprocess" not in meta:
            raise CalibrationError(f"{meta_path} is not a maven-edge calibration set (format {CALIB_FORMAT})")
        if not arrays_path.is_file():
            raise CalibrationError(f"saved calibration set {directory} lacks {CALIB_ARRAYS}")
        try:
            with np.load(arrays_path, allow_pickle=False) as z:
                pixels = [np.asarray(z[k], dtype=np.float32) for k in sorted(z.files)]
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{arrays_path} cannot be read: {exc}") from exc
        cs = cls(pixels, meta["preprocess"], f"saved:{directory}", list(meta.get("prompts") or []),
                 meta.get("preset"), [list(n) for n in meta.get("names") or []])
        if meta.get("digest") and meta["digest"] != cs.digest():
            raise CalibrationError(f"saved calibration set {directory} was modified after it was written "
                                   "(its digest does not match); prepare it again with `maven-edge calib-set`")
        return cs


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _preprocess_config(preprocess: dict[str, Any] | PreprocessConfig) -> PreprocessConfig:
    if isinstance(preprocess, PreprocessConfig):
        return preprocess
    d = dict(preprocess)
    for key in ("mean", "std"):
        if key in d:
            d[key] = tuple(float(x) for x in d[key])
    try:
        return PreprocessConfig(**d)
    except TypeError as exc:
        raise CalibrationError(f"bad preprocess config {preprocess}: {exc}") from exc


# ---- sources ------------------------------------------------------------------------------------


def synthetic_calibration_set(
    preprocess: dict[str, Any] | PreprocessConfig, num_samples: int, split: str = DEFAULT_SPLIT, start: int = 0,
    patch_size: int = 8, preset: str | None = None,
) -> CalibrationSet:
    """`num_samples` samples (images + prompt) of a shapes-world split, rendered at the model's size."""
    from maven_edge.model_src.data import iter_samples

    cfg = _preprocess_config(preprocess)
    if num_samples < 1:
        raise CalibrationError(f"the calibration set is empty: --calib-samples must be >= 1, got {num_samples}")
    try:
        samples = list(iter_samples(split, num_samples, start=start, image_size=cfg.image_size,
                                    patch_size=patch_size))
    except ValueError as exc:
        raise CalibrationError(f"cannot draw calibration samples from split {split!r}: {exc}") from exc
    pixels = [preprocess_images(s.images, cfg) for s in samples]
    return CalibrationSet(pixels, asdict(cfg), f"synthetic:{split}", [s.prompt for s in samples], preset)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_calibration_set(
    folder: str | Path, preprocess: dict[str, Any] | PreprocessConfig, num_samples: int | None = None,
    images_per_sample: int = 1, allow_upscale: bool = False, preset: str | None = None,
) -> CalibrationSet:
    """Images from `folder` (recursively, sorted by path), `images_per_sample` per sample.

    Images smaller than the model input (long side < image_size) are refused unless
    `allow_upscale`: the runtime would upscale them, and calibrating on upscaled pixels gives
    activation ranges that real camera frames do not have.
    """

    cfg = _preprocess_config(preprocess)
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib-images {folder} is not a directory")
    if images_per_sample < 1:
        raise CalibrationError(f"images_per_sample must be >= 1, got {images_per_sample}")
    paths = list_images(folder)
    if num_samples is not None:
        paths = paths[: num_samples * images_per_sample]
    if not paths:
        raise CalibrationError(
            f"the calibration set is empty: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images "
            "or leave out --calib-images to calibrate on the synthetic validation split"
        )
    pixels, names = [], []
    for i in range(0, len(paths), images_per_sample):
        group = paths[i : i + images_per_sample]
        loaded = []
        for p in group:
            try:
                im = load_image(p, name=str(p))
            except MavenError as exc:
                raise CalibrationError(f"calibration image {p} cannot be used: {exc}") from exc
            if not allow_upscale and max(im.size) < cfg.image_size:
                raise CalibrationError(
                    f"calibration image {p} is {im.size[0]}x{im.size[1]}, smaller than the model input "
                    f"{cfg.image_size}x{cfg.image_size}: calibrate on images of the size the device will see "
                    "(or pass --allow-upscale)"
                )
            loaded.append(im)
        try:
            pixels.append(preprocess_images(loaded, cfg))
        except ImageError as exc:
            raise CalibrationError(f"calibration images {[str(p) for p in group]}: {exc}") from exc
        names.append([str(p.relative_to(folder)) for p in group])
    return CalibrationSet(pixels, asdict(cfg), f"folder:{folder}", [], preset, names)


def arrays_calibration_set(arrays: Sequence[np.ndarray] | np.ndarray, preprocess: dict[str, Any] | PreprocessConfig,
                           source: str = "arrays") -> CalibrationSet:
    """Already preprocessed ``pixel_values`` (one [n,3,S,S] array per sample, or one [n,3,S,S] array
    whose images become one sample each)."""
    cfg = _preprocess_config(preprocess)
    if isinstance(arrays, np.ndarray):
        if arrays.ndim != 4:
            raise CalibrationError(f"calibration pixel_values must be [n, 3, H, W], got shape {arrays.shape}")
        arrays = [arrays[i : i + 1] for i in range(arrays.shape[0])]
    return CalibrationSet([np.asarray(a, dtype=np.float32) for a in arrays], asdict(cfg), source)


def resolve_calibration_set(
    spec: str | Path | None, manifest: Any, num_samples: int = 32, split: str = DEFAULT_SPLIT,
    allow_upscale: bool = False, images_per_sample: int = 1,
) -> CalibrationSet:
    """The calibration set for `manifest` from `spec` (None: the synthetic split), checked.

    spec: None, a saved set directory (has calibration.json), a folder of images, or a ``.npy``
    file of preprocessed ``pixel_values`` [n, 3, S, S].
    """
    cfg = manifest.maven_config()
    if spec is None:
        cs = synthetic_calibration_set(manifest.preprocess, num_samples, split, patch_size=cfg.vision.patch_size,
                                       preset=manifest.preset)
    else:
        path = Path(spec)
        if path.is_dir() and (path / CALIB_META).is_file():
            cs = CalibrationSet.load(path)
            cs.pixel_values = cs.pixel_values[:num_samples]
            cs.prompts = cs.prompts[:num_samples]
        elif path.is_file() and path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CalibrationError(f"{path} cannot be read as a numpy array: {exc}") from exc
            cs = arrays_calibration_set(arr[:num_samples] if arr.ndim == 4 else arr, manifest.preprocess,
                                        f"npy:{path}")
        elif path.is_dir():
            cs = folder_calibration_set(path, manifest.preprocess, num_samples, images_per_sample, allow_upscale,
                                        manifest.preset)
        else:
            raise CalibrationError(
                f"--calib-images {path} is neither a folder of images, a saved calibration set ({CALIB_META}) "
                "nor a .npy file of pixel_values"
            )
    check_calibration_set(cs, manifest)
    return cs


_PREPROCESS_KEYS = ("image_size", "mean", "std", "resample", "pad_to_square")


def check_calibration_set(cs: CalibrationSet, manifest: Any) -> None:
    """Refuse (CalibrationError) a set that is empty, has the wrong image size or does not match."""
    if cs.num_samples == 0 or cs.num_images == 0:
        raise CalibrationError(
            f"the calibration set ({cs.source}) is empty: calibration needs at least one image; add images or "
            "raise --calib-samples"
        )
    want = manifest.preprocess
    size = int(want["image_size"])
    for i, arr in enumerate(cs.pixel_values):
        shape = tuple(arr.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise CalibrationError(
                f"calibration sample #{i} ({cs.source}) has shape {shape}; expected [n, 3, {size}, {size}] pixel_values"
            )
        if shape[2:] != (size, size):
            raise CalibrationError(
                f"calibration sample #{i} ({cs.source}) has images of {shape[3]}x{shape[2]} pixels, but these "
                f"artifacts ({manifest.preset}) take {size}x{size}: the set was prepared for another model; "
                "prepare it again for these artifacts (maven-edge calib-set --artifacts ...)"
            )
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
            raise CalibrationError(f"calibration sample #{i} ({cs.source}) is not finite floating-point pixel data")
    differ = [k for k in _PREPROCESS_KEYS if k in cs.preprocess and _norm(cs.preprocess[k]) != _norm(want.get(k))]
    if differ:
        detail = ", ".join(f"{k}: set {cs.preprocess[k]!r} vs artifacts {want.get(k)!r}" for k in differ)
        raise CalibrationError(
            f"the calibration set ({cs.source}) does not match the artifacts: it was preprocessed differently "
            f"({detail}); prepare it again for these artifacts (maven-edge calib-set --artifacts ...)"
        )
    if cs.preset is not None and cs.preset != manifest.preset:
        raise CalibrationError(
            f"the calibration set ({cs.source}) was prepared for preset {cs.preset!r}, but the artifacts are "
            f"{manifest.preset!r}; prepare it again for these artifacts"
        )
    max_images = int(manifest.config.get("max_images", 8))
    worst = max(arr.shape[0] for arr in cs.pixel_values)
    if worst > max_images:
        raise CalibrationError(
            f"the calibration set ({cs.source}) has a sample with {worst} images; the model takes at most {max_images}"
        )


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(round(float(x), 7) for x in v)
    if isinstance(v, float):
        return round(v, 7)
    return v


# ---- component feeds ----------------------------------------------------------------------------


class ComponentFeeds:
    """The inputs every component sees for a calibration set, computed with the fp32 artifacts.

    ``feeds(name)`` returns a list of feed dicts (input name -> array), one per sample (all of a
    sample's images in one batch, as the runtime runs them). Results are computed lazily and
    cached, so asking for several components runs the vision encoder once.
    """

    def __init__(self, artifacts: str | Path, cs: CalibrationSet, manifest: Any = None, threads: int = 0):
        self.artifacts = Path(artifacts)
        self.cs = cs
        self.onnx = OnnxComponents(self.artifacts, manifest, threads=threads)
        self.manifest = self.onnx.manifest
        if self.manifest.recipe != "fp32":
            raise CalibrationError(
                f"calibration inputs must come from fp32 artifacts; {self.artifacts} holds recipe "
                f"{self.manifest.recipe!r}. Point --artifacts at the fp32 export"
            )
        check_calibration_set(cs, self.manifest)
        self._patch: list[np.ndarray] | None = None
        self._heos: list[tuple[dict[str, np.ndarray], np.ndarray]] | None = None

    def patch_features(self) -> list[np.ndarray]:
        if self._patch is None:
            self._patch = [self.onnx.run("vision_encoder", pixel_values=px)["patch_features"]
                           for px in self.cs.pixel_values]
        return self._patch

    def _h_eos_pass(self) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Per sample: the decoder feeds of the [codes, <eos_vis>] pass, and h_eos."""
        if self._heos is None:
            onnx, out = self.onnx, []
            eos_vis = onnx.tokenizer.eos_vis_id
            for px, pf in zip(self.cs.pixel_values, self.patch_features(), strict=True):
                # the discrete tokenizer reads patch_features, or pixel_values when it has its own encoder
                codes = np.asarray(onnx.run("discrete_tokenizer", patch_features=pf, pixel_values=px)["visual_codes"],
                                   dtype=np.int64)
                ids = np.concatenate([codes, np.full((codes.shape[0], 1), eos_vis, np.int64)], axis=1)
                embeds = onnx.embed(ids)
                mask = np.ones_like(ids)
                feeds: dict[str, np.ndarray] = {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask}
                _, hidden, _ = onnx.decode(embeds, mask, onnx.empty_past(ids.shape[0]))
                out.append((feeds, np.ascontiguousarray(hidden[:, -1])))
            self._heos = out
        return self._heos

    def feeds(self, component: str) -> list[dict[str, np.ndarray]]:
        comp = self.manifest.components.get(component)
        if comp is None:
            raise CalibrationError(f"the artifacts have no component {component!r}")
        names = [t.name for t in comp.inputs]
        if component == "vision_encoder":
            rows = [{"pixel_values": px} for px in self.cs.pixel_values]
        elif component in ("discrete_tokenizer", "projector") or (
            component not in FEED_COMPONENTS and names == ["patch_features"]
        ):
            key = names[0]
            rows = [{key: px if key == "pixel_values" else pf}
                    for px, pf in zip(self.cs.pixel_values, self.patch_features(), strict=True)]
        elif component == "patch_selector":
            rows = [{"patch_features": pf, "h_eos": h}
                    for pf, (_, h) in zip(self.patch_features(), self._h_eos_pass(), strict=True)]
        elif component == "embed_tokens":
            rows = [{"input_ids": f["input_ids"]} for f, _ in self._h_eos_pass()]
        elif component == "decoder":
            rows = [self._decoder_feeds(f, names) for f, _ in self._h_eos_pass()]
        else:
            raise CalibrationError(f"no calibration inputs are defined for component {component!r}")
        for r in rows:
            missing = [n for n in names if n not in r]
            if missing:
                raise CalibrationError(f"{component}: calibration feeds lack inputs {missing}")
        return [{n: r[n] for n in names} for r in rows]

    def _decoder_feeds(self, f: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        b, t = f["attention_mask"].shape
        llm = self.manifest.maven_config().llm
        out = {"inputs_embeds": f["inputs_embeds"], "attention_mask": f["attention_mask"],
               "position_ids": np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()}
        empty = np.zeros((b, llm.num_kv_heads, 0, llm.head_dim), np.float32)
        for n in names:
            if n.startswith("past_key_values."):
                out[n] = empty
        return out

    def close(self) -> None:
        self.onnx.sessions.clear()


class FeedReader:
    """One component's calibration feeds as an onnxruntime ``CalibrationDataReader``.

    ``get_next()`` returns the next feed dict or None; ``rewind()`` starts over (ORT's entropy
    and percentile calibrators read the data twice). ``single_images=True`` splits every
    multi-image sample into one-image feeds (TensorRT calibrates at one fixed shape).
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], name: str = "", single_images: bool = False):
        rows = [dict(f) for f in feeds]
        if single_images:
            rows = [{k: v[i : i + 1] for k, v in f.items()} for f in rows for i in range(_batch(f))]
        if not rows:
            raise CalibrationError(f"the calibration set for {name or 'this component'} is empty")
        self.rows = rows
        self.name = name
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.rows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.rows)

    def set_range(self, start_index: int, end_index: int) -> None:  # CalibrationDataReader API
        self._it = iter(self.rows[start_index:end_index])


def _batch(feed: dict[str, np.ndarray]) -> int:
    sizes = {v.shape[0] for v in feed.values() if v.ndim}
    return min(sizes) if sizes else 1


def make_ort_reader(feeds: Sequence[dict[str, np.ndarray]], name: str = "", single_images: bool = True) -> Any:
    """A :class:`FeedReader` that is also an ``onnxruntime.quantization.CalibrationDataReader``.

    Samples are split into one-image feeds by default: the entropy and percentile calibrators
    stack every batch's tensors into one histogram input and need equal shapes."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(feeds, name, single_images)

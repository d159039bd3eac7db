"""Image URLs of a chat request -> decoded images, under the operator's policy.

* ``data:image/png|jpeg|webp;base64,...``: always accepted (the OpenAI way to send an image).
* a local path or ``file://`` URL: only with ``--allow-local-images DIR``, and only inside that
  directory once symlinks and ``..`` are resolved.
* ``http://`` / ``https://``: only with ``--allow-remote-images``, fetched with a byte limit, a
  total time limit and a redirect limit. The server then makes requests wherever its clients
  point it (including the server's own network); enable it only for clients you trust.

Every image is decoded here (before the request takes a generation slot) with the server's
:class:`~maven_edge.core.preprocess.ImageLimits`: PNG, JPEG or WebP only, a pixel limit read from
the header before decoding, a byte limit. Failures are :class:`~maven_edge.core.errors.ImageError`
(a 400) naming the image by its number in the conversation.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from maven_edge.core.errors import ImageError, InputError
from maven_edge.core.preprocess import ImageLimits, load_image

#: What a data URI or a fetched image may be.
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
SERVER_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    limits: ImageLimits = ImageLimits(formats=SERVER_FORMATS)
    local_root: Path | None = None  # --allow-local-images DIR
    allow_remote: bool = False  # --allow-remote-images
    remote_timeout_s: float = 10.0  # whole fetch, redirects included
    remote_max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.local_root is not None:
            root = Path(self.local_root).expanduser().resolve()
            if not root.is_dir():
                raise InputError(f"--allow-local-images {self.local_root}: not a directory")
            object.__setattr__(self, "local_root", root)
        if self.remote_timeout_s <= 0 or self.remote_max_redirects < 0:
            raise InputError("the remote image timeout must be > 0 and the redirect limit >= 0")


def load_url(url: str, number: int, policy: ImagePolicy) -> Image.Image:
    """Image number `number` (1-based, for messages) of a request as an RGB PIL image."""
    label = f"image {number}"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return load_image(decode_data_uri(url, label, policy.limits), policy.limits, name=label)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise InputError(
                f"{label}: http(s) image URLs are refused by this server; send the image as a data: URI "
                "(base64), or start the server with --allow-remote-images")
        return load_image(fetch(url, label, policy), policy.limits, name=label)
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        return load_image(local_path(url, label, policy), policy.limits, name=label)
    raise InputError(f"{label}: unsupported URL scheme '{scheme}:'; send a data: URI (base64 PNG, JPEG or WebP)")


def decode_data_uri(url: str, label: str, limits: ImageLimits) -> bytes:
    """The bytes of a ``data:<image type>;base64,<payload>`` URI."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise ImageError(f"{label}: malformed data URI (no ',' before the payload)")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"
    if media not in MEDIA_TYPES:
        raise ImageError(f"{label}: unsupported media type '{media}' in the data URI; send image/png, "
                         "image/jpeg or image/webp")
    if "base64" not in params[1:]:
        raise ImageError(f"{label}: the data URI must be base64-encoded (data:{media};base64,...)")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_bytes + 3:
        raise ImageError(f"{label} is too large (about {len(payload) // 4 * 3 / 2**20:.1f} MiB; the limit is "
                         f"{limits.max_bytes / 2**20:.1f} MiB); downscale or re-encode it")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{label}: the data URI's payload is not valid base64 ({exc})") from None
    if not data:
        raise ImageError(f"{label}: the data URI's payload is empty")
    return data


def local_path(url: str, label: str, policy: ImagePolicy) -> Path:
    """The confined local path of a path or ``file://`` URL."""
    root = policy.local_root
    if root is None:
        raise InputError(f"{label}: local image paths are refused by this server; send the image as a data: "
                         "URI (base64), or start the server with --allow-local-images DIR")
    if url.lower().startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"{label}: file:// URLs must name a local file (file:///path), got host "
                             f"'{parsed.netloc}'")
        raw = unquote(parsed.path)
    else:
        raw = url
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = root / path
    real = path.resolve()
    if not real.is_relative_to(root):
        raise InputError(f"{label}: {raw!r} is outside the directory this server may read images from")
    if not real.is_file():
        raise ImageError(f"{label}: no image file at {raw!r} in the allowed directory")
    return real


def fetch(url: str, label: str, policy: ImagePolicy) -> bytes:
    """GET an image: at most ``limits.max_bytes`` bytes, ``remote_max_redirects`` redirects and
    ``remote_timeout_s`` seconds in all."""
    import httpx

    max_bytes = policy.limits.max_bytes
    deadline = time.monotonic() + policy.remote_timeout_s
    accept = ", ".join(sorted(set(MEDIA_TYPES) - {"image/jpg"}))
    try:
        with httpx.Client(follow_redirects=True, max_redirects=policy.remote_max_redirects,
                          timeout=policy.remote_timeout_s, trust_env=False) as client:
            with client.stream("GET", url, headers={"Accept": accept}) as resp:
                if resp.status_code != 200:
                    raise ImageError(f"{label}: fetching {url} gave HTTP {resp.status_code}")
                size = resp.headers.get("content-length")
                if size is not None and size.isdigit() and int(size) > max_bytes:
                    raise _too_large(label, max_bytes)
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise _too_large(label, max_bytes)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("total time limit")
                return bytes(buf)
    except httpx.TooManyRedirects:
        raise ImageError(f"{label}: {url} redirects more than {policy.remote_max_redirects} times") from None
    except httpx.TimeoutException:
        raise ImageError(f"{label}: fetching {url} took longer than {policy.remote_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ImageError(f"{label}: {url} could not be fetched ({type(exc).__name__}: {exc})") from None


def _too_large(label: str, max_bytes: int) -> ImageError:
    return ImageError(f"{label} is larger than the limit of {max_bytes / 2**20:.1f} MiB; downscale or re-encode it")


def load_all(urls: Any, policy: ImagePolicy) -> list[Image.Image]:
    return [load_url(url, k + 1, policy) for k, url in enumerate(urls)]

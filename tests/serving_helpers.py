"""Real `maven-edge serve` processes for the serving tests, on 127.0.0.1 only, that stop by themselves.

Each server runs in a fresh interpreter that refuses to import torch or transformers (the server
is torch-free), listens on a port the OS picks (``--port 0``; the URL is read from its log) and
has ``--exit-after`` as a backstop; fixtures terminate it, and kill it if it does not stop.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "model_src" / "samples"
DEMO = json.loads((SAMPLES / "demo.json").read_text())

LAUNCH = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"the server tried to import {name}")
        return None

if "--ray" not in sys.argv:
    sys.meta_path.insert(0, Block())
from maven_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`maven-edge serve ARGS` in a subprocess; ``url`` once ready."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 exit_after_s: float = 900, port: int = 0):
        self.args = ["serve", *args, "--host", "127.0.0.1", "--port", str(port), "--exit-after", str(exit_after_s),
                     "--no-access-log", "--log-level", "warning"]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 180, wait_ready: bool = True) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *self.args], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.url:
            m = re.search(r"listening on (http://\S+)", self.log())
            if m:
                self.url = m.group(1)
                break
            self._check_alive(deadline)
            time.sleep(0.1)
        while wait_ready:
            try:
                if httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            self._check_alive(deadline)
            time.sleep(0.1)
        return self

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        if time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"the server did not get ready in time:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        return self.proc.returncode

    def client(self, api_key: str = "unused", **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 120),
                      **kw)


# ---- request building ---------------------------------------------------------------------------


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_uri(image: Any, media: str = "image/png") -> str:
    """A data: URI of a path, PNG bytes or a PIL image."""
    if isinstance(image, (str, Path)):
        raw = Path(image).read_bytes()
    elif isinstance(image, Image.Image):
        raw = png_bytes(image)
    else:
        raw = bytes(image)
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *urls: str, text_first: bool = False) -> dict[str, Any]:
    parts = [image_part(u) for u in urls]
    parts = ([{"type": "text", "text": text}] + parts) if text_first else (parts + [{"type": "text", "text": text}])
    return {"role": "user", "content": parts}

"""Run the app in this process with uvicorn (``maven-edge serve`` without ``--ray``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
from typing import Any

from maven_edge.serving.app import create_app
from maven_edge.serving.config import API_KEY_ENV, ServerConfig

log = logging.getLogger("maven_edge.serving")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def warn_if_exposed(host: str, config: ServerConfig) -> None:
    if config.api_key is None and not is_loopback(host):
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model. "
                    "Set --api-key or $%s, or bind to 127.0.0.1", host, API_KEY_ENV)


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, exit_after_s: float | None = None,
               log_level: str = "info", access_log: bool = True) -> int:
    """Serve until interrupted (or for `exit_after_s` seconds); returns the exit status: 0, or 2 when
    the model failed to load (the server then stops by itself)."""
    import uvicorn

    status = {"code": 0}
    holder: dict[str, Any] = {}

    def on_load_error(exc: BaseException) -> None:
        status["code"] = 2
        print(f"maven-edge serve: error: {exc}", file=sys.stderr, flush=True)
        holder["server"].should_exit = True

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            for server in getattr(self, "servers", []):
                for sock in server.sockets:
                    bound_host, bound_port = sock.getsockname()[:2]
                    print(f"maven-edge serve: listening on {url_of(bound_host, bound_port)}", file=sys.stderr,
                          flush=True)

    warn_if_exposed(host, config)
    app = create_app(config, background_load=True, on_load_error=on_load_error)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                   timeout_graceful_shutdown=5, lifespan="on"))
    holder["server"] = server
    timer = None
    if exit_after_s:
        def stop() -> None:
            log.info("--exit-after %s s reached; stopping", exit_after_s)
            server.should_exit = True

        timer = threading.Timer(exit_after_s, stop)
        timer.daemon = True
        timer.start()
    try:
        server.run()
    finally:
        if timer is not None:
            timer.cancel()
    if status["code"] == 0 and not server.started:
        return 1  # uvicorn could not start (e.g. the port is taken); it logged why
    return status["code"]

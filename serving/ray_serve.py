"""Scale-out: the same ASGI app as a Ray Serve deployment (``maven-edge serve --ray``).

    pip install -c constraints.txt 'maven-edge[ray]'
    maven-edge serve --artifacts artifacts/tiny --ray --replicas 2 --threads 1

Each replica is a separate process (a Ray actor) that builds :func:`maven_edge.serving.app.create_app`
from the same :class:`ServerConfig` (``serve.ingress`` with a builder, so nothing unpicklable crosses
the wire) and opens its own pipeline in the app's lifespan; Ray starts routing to a replica once its
model is loaded. Ray's HTTP proxy listens on ``--host``/``--port`` and spreads requests over the
replicas; every replica keeps its own admission control (``--max-concurrency``/``--max-queue``),
and Ray may send it up to ``max_concurrency + max_queue + 1`` requests at once, so overload still
answers 429 from a replica. Requests beyond that wait in Ray's router (``--ray-max-queued``; past it
Ray answers 503).

Replica counts: ``--replicas N`` (fixed), or autoscaling with ``--min-replicas``/``--max-replicas``/
``--target-ongoing-requests`` (Ray's ``autoscaling_config``). ``--address auto`` joins the cluster
``ray start`` runs on this machine (multi-node: docs/serving.md); without ``--address`` a local Ray
is started and stopped with the command.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from maven_edge.core.errors import BackendError, InputError
from maven_edge.serving.config import ServerConfig
from maven_edge.serving.server import url_of, warn_if_exposed

log = logging.getLogger("maven_edge.serving")

APP_NAME = "maven-edge"
DEPLOYMENT_NAME = "MavenServer"


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join a cluster
    replicas: int | None = None  # fixed replica count (default 1 unless autoscaling)
    min_replicas: int | None = None  # autoscaling: fewest replicas
    max_replicas: int | None = None  # autoscaling: most replicas (turns autoscaling on)
    target_ongoing_requests: float | None = None  # autoscaling: requests per replica Ray aims for
    num_cpus: float = 1.0  # reserved per replica
    num_gpus: float = 0.0  # reserved per replica
    max_queued_requests: int = -1  # Ray's router queue when every replica is full (-1: no limit)

    def deployment_options(self, config: ServerConfig) -> dict[str, Any]:
        autoscale = self.max_replicas is not None or self.min_replicas is not None
        if autoscale and self.replicas is not None:
            raise InputError("give either --replicas (fixed) or --min-replicas/--max-replicas (autoscaling), not both")
        opts: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            # enough for a replica's own slots and queue, plus one it can refuse with 429
            "max_ongoing_requests": config.max_concurrency + config.max_queue + 1,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": 10,
        }
        if autoscale:
            lo = 1 if self.min_replicas is None else self.min_replicas
            hi = self.max_replicas if self.max_replicas is not None else max(lo, 1)
            if lo < 0 or hi < max(lo, 1):
                raise InputError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {lo}, {hi}")
            target = self.target_ongoing_requests or float(config.max_concurrency)
            opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target}
        else:
            n = 1 if self.replicas is None else self.replicas
            if n < 1:
                raise InputError(f"--replicas must be >= 1, got {n}")
            opts["num_replicas"] = n
        return opts


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise BackendError(f"Ray Serve is not installed ({exc}); pip install -c constraints.txt 'maven-edge[ray]'"
                           ) from None
    return ray, serve


def deploy(config: ServerConfig, ray_opts: RayOptions, host: str, port: int) -> str:
    """Start Ray (or join `ray_opts.address`), start Serve's HTTP proxy on host:port and deploy the
    app; returns the URL once every replica has loaded its model."""
    ray, serve = _import_ray()
    options = ray_opts.deployment_options(config)
    if port == 0:
        raise InputError("Ray Serve needs a fixed --port (0 is not supported with --ray)")

    def build_app() -> Any:  # runs in each replica
        from maven_edge.serving.app import create_app

        return create_app(config, background_load=False)

    ray.init(address=ray_opts.address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    ingress = serve.ingress(build_app)(type(DEPLOYMENT_NAME, (), {}))
    deployment = serve.deployment(ingress).options(**options)
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False)
    return url_of(host, port)


def shutdown() -> None:
    ray, serve = _import_ray()
    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def run_ray(config: ServerConfig, ray_opts: RayOptions, host: str = "127.0.0.1", port: int = 8000,
            exit_after_s: float | None = None) -> int:
    """`maven-edge serve --ray`: deploy, print the URL, serve until interrupted (or `exit_after_s`)."""
    warn_if_exposed(host, config)
    started = time.monotonic()
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signum)
        stop.set()

    # explicit handlers: a background job's SIGINT is ignored by default, and SIGTERM would skip the cleanup
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = deploy(config, ray_opts, host, port)
        for s in previous:  # ray.init may have installed its own
            signal.signal(s, on_signal)
        print(f"maven-edge serve: Ray Serve application '{APP_NAME}' ready; listening on {url}",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if exit_after_s is not None and time.monotonic() - started >= exit_after_s:
                log.info("--exit-after %s s reached; stopping", exit_after_s)
                break
    finally:
        shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0

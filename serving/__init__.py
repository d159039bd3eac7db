"""maven_edge.serving: an OpenAI-compatible HTTP server over :class:`~maven_edge.runtime.pipeline.MavenPipeline`.

``maven-edge serve --artifacts DIR`` (one process, uvicorn) or ``maven-edge serve --ray`` (Ray Serve
replicas of the same ASGI app); ``maven-edge bench-serve`` drives either. See docs/serving.md.

The layer above the runtime: it imports ``maven_edge.core`` and ``maven_edge.runtime``; nothing
below imports it. torch-free (serving exported artifacts needs no torch).
"""

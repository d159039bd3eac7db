"""What one server (or one Ray Serve replica) is: the pipeline it opens and its serving limits.

Plain dataclasses, picklable, so the same :class:`ServerConfig` travels to Ray Serve replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maven_edge.core.config import H_EOS_MODES
from maven_edge.core.errors import InputError
from maven_edge.core.sampling import DEFAULT_MAX_NEW_TOKENS
from maven_edge.runtime.options import PipelineOptions
from maven_edge.serving.images import ImagePolicy

#: Environment variable read for the API key when --api-key is not given.
API_KEY_ENV = "MAVEN_EDGE_API_KEY"


@dataclass
class ServerConfig:
    pipeline: PipelineOptions
    model_name: str | None = None  # the id clients send as `model`; default: the model's config name
    api_key: str | None = None  # bearer token required on /v1/*; None = no auth
    max_concurrency: int = 1  # generations running at once
    max_queue: int = 16  # requests waiting for a slot; beyond: 429
    request_timeout_s: float = 120.0  # per request: queue wait + generation
    max_body_bytes: int = 8 * 2**20  # request body; beyond: 413
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when the request gives neither max_tokens nor max_completion_tokens
    h_eos: str = "separate"  # where h_eos is read when the request does not say (docs/design.md §5.2)
    images: ImagePolicy = field(default_factory=ImagePolicy)
    warmup: bool = True  # one 1-token generation after loading, before /health says ready

    def __post_init__(self) -> None:
        problems = []
        if self.max_concurrency < 1:
            problems.append(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            problems.append(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            problems.append(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            problems.append(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.default_max_tokens < 1:
            problems.append(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.h_eos not in H_EOS_MODES:
            problems.append(f"h_eos must be one of {', '.join(H_EOS_MODES)}, got {self.h_eos!r}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("the API key is empty")
        if problems:
            raise InputError("bad server option: " + "; ".join(problems))

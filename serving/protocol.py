"""The wire format: OpenAI's chat-completions request schema (the subset this server runs) and
OpenAI's error object.

Every model forbids fields it does not know, so a parameter this server does not implement is a
400 naming it, never silently ignored. Types are strict (``"0.5"`` is not a temperature).

Supported request fields: ``model``, ``messages``, ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``,
``n`` (1 only). ``frequency_penalty`` / ``presence_penalty`` are accepted only at 0 and
``logprobs`` only as false: those values are the defaults, so accepting them changes nothing.

MaVEn's own request fields, beside OpenAI's (as vLLM takes its extra sampling parameters; with the
OpenAI client, send them in ``extra_body``): ``visual_token_budget`` and ``min_patches`` (rank the
patches of all the request's images so codes + patches fit the budget, docs/budget.md) and
``h_eos`` (``"separate"`` or ``"context"``: where the patch selector's h_eos is read, docs/design.md
§5.2).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", strict=True)


# ---- content parts ---------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)
    # Every image is encoded at the model's one input resolution, so the three values are the same.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)


class VideoPart(BaseModel):
    """A video (vLLM's ``video_url`` part): its frames, sampled at the server's --video-fps, become
    the turn's images, labelled ``Frame k:``."""

    model_config = _STRICT
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# ---- messages --------------------------------------------------------------------------------


class SystemMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(BaseModel):
    model_config = _STRICT
    role: Literal["user"]
    content: str | list[ContentPart]


class AssistantMessage(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"]
    content: str | list[TextPart]


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


def message_text(content: str | list[Any]) -> list[str]:
    """The text parts of a message's content, in order."""
    if isinstance(content, str):
        return [content]
    return [p.text for p in content if isinstance(p, TextPart)]


# ---- the request -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _STRICT

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    # MaVEn's fields (see the module docstring)
    visual_token_budget: int | None = Field(default=None, ge=1)
    min_patches: int = Field(default=1, ge=0)
    h_eos: Literal["separate", "context"] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: this server returns one choice per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(v)}")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("repetition penalties are not supported; leave it out or send 0")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported; leave it out or send false")
        return v

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


SUPPORTED_PARAMETERS = tuple(ChatCompletionRequest.model_fields)


# ---- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the server answers with OpenAI's error object and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_TAGS = frozenset({"system", "developer", "user", "assistant", "text", "image_url", "video_url"})


def _loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a parameter path (``messages[0].content[1].image_url.url``):
    the names pydantic adds for union branches (``str``, ``list[...]``, a discriminator's tag
    right after a list index) are dropped."""
    parts: list[str] = []
    prev: Any = None
    for i, item in enumerate(loc):
        skip = item == "body" or (isinstance(item, str) and ("[" in item or item == "str")) or (
            isinstance(prev, int) and item in _UNION_TAGS and i + 1 < len(loc))
        prev = item
        if skip:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 for a request that does not fit the schema: the first problem, in words."""
    if not errors:
        return APIError(400, "invalid request body")
    # an unknown field is the most useful thing to report, then the most specific (deepest) problem
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), None) or max(
        errors, key=lambda e: len(e.get("loc", ())))
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    param = _loc(loc) or None
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"the request body is not valid JSON ({ctx.get('error', first.get('msg'))})",
                        code="invalid_json")
    if kind == "extra_forbidden":
        name = param or "?"
        top = "." not in name and "[" not in name
        hint = f"; supported parameters: {', '.join(SUPPORTED_PARAMETERS)}" if top else ""
        return APIError(400, f"unknown or unsupported parameter '{name}'{hint}", code="unknown_parameter",
                        param=name)
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", code="missing_required_parameter",
                        param=param)
    if kind in ("model_type", "model_attributes_type", "dict_type") and not param:
        return APIError(400, "the request body must be a JSON object", code="invalid_request")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"invalid '{param}': {msg}" if param else msg, code="invalid_value", param=param)


def parse_request(data: bytes | str | dict[str, Any]) -> ChatCompletionRequest:
    """The request in a JSON body (bytes or str) or an already parsed object; APIError(400) if it does not fit."""
    try:
        if isinstance(data, (bytes, bytearray, str)):
            return ChatCompletionRequest.model_validate_json(data)
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None

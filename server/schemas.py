"""Request and response bodies: what OpenAPI at /docs shows and what routes validate.

A predict body is parsed by :func:`parse_predict_body`, not by FastAPI, so that its sizes are
checked before any per-item work: a 1 MiB body of half a million items is refused after one
``json.loads`` and a ``len``, instead of after a million validation errors.
"""

from __future__ import annotations

import json
import re

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

TextOrPair = str | tuple[str, str]
# Lone surrogates survive JSON decoding but no tokenizer takes them: refuse them at the door.
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_HINT = " (send the body as JSON with Content-Type: application/json)"


class BodyError(ValueError):
    """A predict body that is not what :class:`PredictRequest` describes; the message says why."""


class PredictRequest(BaseModel):
    """Texts, or ``[text, text_pair]`` pairs (a batch may mix both)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TextOrPair] = Field(
        ..., description="texts or [premise, hypothesis] pairs", examples=[["a lovely film", "a dull film"]]
    )
    min_confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="this request's operating point for the profile's abstention rule (default: the "
        "profile's own); ignored by a profile without a rule",
    )


class PredictionOut(BaseModel):
    label: str | None = Field(
        ..., description="the predicted label; null (or the profile's fallback label) when abstained"
    )
    score: float
    scores: dict[str, float]
    abstained: bool = Field(False, description="true when the input belongs to none of the profile's labels")
    confidence: float | None = Field(
        None, description="the input's confidence under the profile's abstention rule (absent without one)"
    )


class PredictResponse(BaseModel):
    profile: str
    version: int = Field(..., description="the one profile version that served every input of this request")
    predictions: list[PredictionOut]


class ProfileMeta(BaseModel):
    """A stored profile's metadata: the .xpm header plus what the store adds."""

    model_config = ConfigDict(extra="allow")
    id: str
    version: int = Field(..., description="store-wide, increases with every write")
    created_at: str
    updated_at: str
    sha256: str
    bytes: int
    kind: str
    k: int
    labels: list[str]
    bank_id: str
    model_id: str
    num_layers: int
    num_adapters: int
    hidden_size: int
    bottleneck: int
    max_length: int
    format_version: int
    meta: dict[str, str]
    abstain: str | None = Field(None, description="the abstention rule's score; null: never abstains")
    fallback: str | None = Field(None, description="the label an abstaining input gets (null: none)")


class PutAnswer(ProfileMeta):
    """What a PUT stored: the metadata, and whether the upload changed anything."""

    unchanged: bool = Field(
        False,
        description="true when these exact bytes were stored already: no new version, caches kept",
    )


class ProfileList(BaseModel):
    profiles: list[ProfileMeta]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: str = Field(..., description="stable machine-readable code")
    message: str
    request_id: str | None = Field(None, description="the request's X-Request-ID, for the server's logs")


class Health(BaseModel):
    status: str
    detail: dict = Field(default_factory=dict)


def _loads(raw: bytes) -> object:
    """pydantic-core's JSON parser (jiter: about 3x the standard library's speed on a body of
    half a million numbers). It refuses escaped lone surrogates outright; the standard library
    decodes those, so that the refusal can name the input that holds one."""
    try:
        return pydantic_core.from_json(raw)
    except ValueError as exc:
        if "escape" not in str(exc) and "surrogate" not in str(exc):
            raise
        return json.loads(raw)


def parse_predict_body(
    raw: bytes, content_type: str | None, max_inputs: int, max_text_chars: int
) -> list[TextOrPair]:
    """The inputs of a predict body (see :func:`parse_predict_request`)."""
    return parse_predict_request(raw, content_type, max_inputs, max_text_chars)[0]


def parse_predict_request(
    raw: bytes, content_type: str | None, max_inputs: int, max_text_chars: int
) -> tuple[list[TextOrPair], float | None]:
    """The inputs and the optional ``min_confidence`` of a predict body: counts and sizes first,
    then each item's type and length.

    Work is bounded by the body size (already capped by the body limit): one C-speed parse, then
    at most ``max_inputs`` items are looked at. Raises :class:`BodyError`.
    """
    hint = _JSON_HINT if content_type and "json" not in content_type.lower() else ""
    try:
        body = _loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5,000-digit number, deep nesting
        raise BodyError("the body is not valid JSON" + (hint or _JSON_HINT)) from None
    if not isinstance(body, dict):
        raise BodyError('the body must be a JSON object {"inputs": [...]}' + hint)
    extra = next((k for k in body if k not in ("inputs", "min_confidence")), None)
    unknown = f"unknown field {extra[:64]!r}: extra fields are not permitted" if extra is not None else ""
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        required = "inputs: a list of texts or [text, text_pair] pairs is required"
        raise BodyError(f"{required}; {unknown}" if unknown else required)
    if unknown:
        raise BodyError(unknown)
    if not inputs:
        raise BodyError("inputs must hold at least one text")
    point = body.get("min_confidence")
    if point is not None and (
        isinstance(point, bool) or not isinstance(point, int | float) or not 0.0 <= point <= 1.0
    ):
        raise BodyError(f"min_confidence must be a number in [0, 1], got {str(point)[:64]}")
    if len(inputs) > max_inputs:
        raise BodyError(f"{len(inputs)} inputs; at most {max_inputs} per request")
    out: list[TextOrPair] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            texts: tuple[str, ...] = (item,)
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item):
            texts = (item[0], item[1])
        else:
            raise BodyError(f"inputs[{i}]: a text or a [text, text_pair] pair of two texts")
        for text in texts:
            if len(text) > max_text_chars:
                raise BodyError(f"inputs[{i}] has {len(text)} characters; at most {max_text_chars}")
            if _SURROGATE.search(text):
                raise BodyError(f"inputs[{i}] holds a lone UTF-16 surrogate: not text")
        out.append(item if isinstance(item, str) else (item[0], item[1]))
    return out, None if point is None else float(point)

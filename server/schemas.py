"""Request and response bodies: what OpenAPI at /docs shows and what routes validate."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

TextOrPair = str | tuple[str, str]


class PredictRequest(BaseModel):
    """Texts, or ``[text, text_pair]`` pairs (a batch may mix both)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TextOrPair] = Field(
        ..., description="texts or [premise, hypothesis] pairs", examples=[["a lovely film", "a dull film"]]
    )


class PredictionOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


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


class ProfileList(BaseModel):
    profiles: list[ProfileMeta]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class ErrorBody(BaseModel):
    error: str = Field(..., description="stable machine-readable code")
    message: str


class Health(BaseModel):
    status: str
    detail: dict = Field(default_factory=dict)

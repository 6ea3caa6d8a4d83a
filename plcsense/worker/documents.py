"""What the worker publishes: result and error documents, validated by pydantic and serialised compactly."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from plcsense.errors import ErrorCode


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> bytes:
        """Only the fields given (``id`` stays even when null: consumers match answers to inputs by it)."""
        return self.model_dump_json(exclude_unset=True).encode()


class ModelRef(BaseModel):
    name: str
    version: str


class Ranked(BaseModel):
    label: str
    score: float


class ResultDocument(_Document):
    """One model answer; classification fills ``label``/``top`` (and ``unknown``/``ood_score`` when the model has an
    ood score), anomaly fills ``threshold``/``channels``."""

    id: str | None
    topic: str
    model: ModelRef
    task: Literal["classification", "anomaly"]
    score: float
    label: str | None = None
    top: list[Ranked] | None = None
    unknown: bool | None = None
    """True when the input is unlike the model's training data: its label is not to be trusted."""
    ood_score: float | None = None
    threshold: float | None = None
    is_anomaly: bool | None = None
    channels: dict[str, float] | None = None
    latency_ms: float
    ts: float | str


class ErrorDocument(_Document):
    """An input that got no result, and why (``detail`` says what to fix)."""

    error: ErrorCode
    detail: str
    topic: str
    id: str | None
    ts: float

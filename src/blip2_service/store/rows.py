"""What the store hands back: typed rows, the same keys the HTTP API and the web page show.

TypedDicts rather than dataclasses because each row goes out as JSON as it is; typing them lets
mypy check every reader's keys instead of trusting a `dict[str, Any]`.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class CaptionItem(TypedDict):
    """One stored caption (succeeded or failed) of one image under one model and settings."""

    id: int
    image_sha256: str
    source: str
    source_ref: str
    model: str
    text: str
    texts: list[str]
    emoji_mappings: list[dict[str, str]]
    status: Literal["succeeded", "failed"]
    error: str | None
    processing_time: float | None
    settings: dict[str, Any]  # GenerationSettings.as_dict(): numbers, a prompt or None
    created_at: str


class Location(TypedDict):
    """Where an image was seen: a watched file, a URL, an upload, a queue message."""

    source: str
    source_ref: str
    first_seen_at: str
    last_seen_at: str
    gone_at: str | None


class ImageDetail(TypedDict):
    """An image with every place it was seen and every caption it has."""

    sha256: str
    width: int | None
    height: int | None
    format: str | None
    byte_size: int
    first_seen_at: str
    locations: list[Location]
    captions: list[CaptionItem]

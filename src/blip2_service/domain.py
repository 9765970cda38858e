"""The vocabulary every door shares: requests, results and the two kinds of failure.

Adapters translate their world into a `CaptionRequest` and a `CaptionResult`
back; the failure type decides what they do next: a `PermanentError` is
stored and reported, a `TransientError` is retried and never loses input.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

# What UTF-8 cannot carry, or Postgres text cannot hold: NUL and lone surrogates.
_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")


def has_unwritable(text: str) -> bool:
    """Whether `text` holds a NUL or a lone surrogate (what `utf8_text` would spell out)."""
    return _UNWRITABLE.search(text) is not None


def utf8_text(text: str) -> str:
    """`text` as something UTF-8, SQLite, Postgres and every JSON reader can carry.

    Linux file names are bytes: one that is not UTF-8 arrives as surrogate escapes (os.fsdecode),
    a JSON message may hold a lone "\\ud800", and Postgres text cannot hold NUL. Each such
    character is spelled as Python spells it in a bytes literal (`\\xff` for an undecodable byte,
    `\\ud800` for another lone surrogate, `\\x00` for NUL) so the name stays readable; anything
    else, backslashes included, is kept as it is.
    """
    return _UNWRITABLE.sub(_spelled, text)


def _spelled(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0 or 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code & 0xFF:02x}"
    return f"\\u{code:04x}"


def json_text(obj: Any) -> str:
    """JSON for people to read (emojis as themselves, not escapes) that encodes as UTF-8: a lone
    surrogate in a string is written as `utf8_text` spells it."""
    return _UNWRITABLE.sub(lambda m: _spelled(m).replace("\\", "\\\\"), json.dumps(obj, ensure_ascii=False))


class Source(StrEnum):
    HTTP = "http"
    WATCH = "watch"
    QUEUE = "queue"
    CLI = "cli"


class CaptionError(Exception):
    """Base of every failure a user can cause or meet; `status` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class PermanentError(CaptionError):
    """Retrying cannot help (bad image, missing file, refused URL): store it as failed."""

    status = 400


# The kinds of permanent failure, one per HTTP status, shared by every door (CONTRACT §1).
class BadInput(PermanentError):
    """Bad or missing parameters, a malformed message or body."""

    status = 400


class Forbidden(PermanentError):
    """A path outside the allowed roots, a URL to a refused address."""

    status = 403


class NotFound(PermanentError):
    status = 404


class RequestTimedOut(PermanentError):
    """The client did not finish sending its request in time (REQUEST_TIMEOUT)."""

    status = 408


class TooLarge(PermanentError):
    """Bytes or pixels over MAX_FILE_SIZE / MAX_IMAGE_PIXELS."""

    status = 413


class Unsupported(PermanentError):
    """Not an image format the service reads."""

    status = 415


class Undecodable(PermanentError):
    """An image whose bytes cannot be decoded (truncated, corrupt)."""

    status = 422


class FetchFailed(PermanentError):
    """A URL that could not be fetched (its server failed, timed out or could not be reached)."""

    status = 502


class TransientError(CaptionError):
    """A passing failure (store or broker down, overloaded): retry later, keep the input."""

    status = 503

    def __init__(self, message: str, *, status: int | None = None, retry_after: float = 5.0) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class Overloaded(TransientError):
    """The pipeline's bounded queue is full: back-pressure, not a failure of the input."""


class ModelNotReady(TransientError):
    """The model is still loading, or failed to load."""


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """What, besides the image and the model, decides the caption; part of the idempotency key."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    prompt: str | None = None
    num_captions: int = 1

    @property
    def sampled(self) -> bool:
        # Several alternatives only make sense sampled; beams would return near-duplicates.
        return self.num_captions > 1

    def key(self) -> str:
        """A short stable digest: equal settings give equal keys across processes and hosts."""
        payload = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "prompt": self.prompt or "",
            "num_captions": self.num_captions,
        }


@dataclass(frozen=True, slots=True)
class EmojiMapping:
    emoji: str
    word: str

    def as_dict(self) -> dict[str, str]:
        return {"emoji": self.emoji, "word": self.word}


@dataclass(frozen=True, slots=True)
class Prediction:
    text: str
    emoji_mappings: tuple[EmojiMapping, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "emoji_mappings": [m.as_dict() for m in self.emoji_mappings]}


@dataclass(slots=True)
class CaptionRequest:
    """One image to caption, whichever door it came through.

    `data` holds the raw bytes: every adapter reads the file, the upload, the
    URL or the message body itself, so the pipeline sees one kind of input.
    """

    source: Source
    source_ref: str
    data: bytes
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    store: bool = True
    refresh: bool = False
    # Watcher bookkeeping: lets a restart recognise a file without re-hashing it.
    file_size: int | None = None
    file_mtime: float | None = None
    # Someone waits on this answer now (an HTTP request, here or at a gateway): it goes in the
    # model's next batch, ahead of bulk work, and has slots bulk work cannot take.
    interactive: bool = False


@dataclass(slots=True)
class CaptionResult:
    status: Literal["succeeded", "failed"]
    model: str
    predictions: list[Prediction]
    processing_time: float
    image_sha256: str | None = None
    record_id: int | None = None
    cached: bool = False
    error: str | None = None
    error_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def text(self) -> str:
        return self.predictions[0].text if self.predictions else ""

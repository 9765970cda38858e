"""The queue's message formats (CONTRACT §3), shared by the consumer and the publisher.

Pure functions: parse a request body, build a result body. No AMQP here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .domain import BadInput
from .intake import check_prompt

IMAGE_FIELDS = ("path", "url", "image_b64")
DEAD_SUFFIX = ".dead"
REASON_HEADER = "x-blip2-error"


@dataclass(frozen=True, slots=True)
class QueueRequest:
    kind: str  # "path" | "url" | "image_b64"
    value: str
    id: Any = None
    prompt: str | None = None
    # Optional, sent by a gateway (INFERENCE=queue) for its HTTP requests.
    num_captions: int = 1
    store: bool = True
    refresh: bool = False
    source_ref: str | None = None
    # Unix time (s) after which no one waits for the answer: the gateway's client has had its
    # 503. A worker that takes the request later drops it instead of captioning it.
    deadline: float | None = None

    def echo(self) -> dict[str, Any]:
        """The request as echoed in results: its id and input (embedded bytes summarised)."""
        shown = self.value if self.kind != "image_b64" else f"<{len(self.value)} base64 characters>"
        out: dict[str, Any] = {"id": self.id, self.kind: shown}
        if self.prompt:
            out["prompt"] = self.prompt
        return out


def parse_request(body: bytes | str) -> QueueRequest:
    """Validate a request body; BadInput says what is wrong (never retried)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"The message body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput("The message body must be a JSON object with one of path, url, image_b64")
    present = [f for f in IMAGE_FIELDS if data.get(f) not in (None, "")]
    if len(present) != 1:
        which = ", ".join(present) if present else "none"
        raise BadInput(f"Exactly one of path, url, image_b64 is needed; the message has {which}")
    kind = present[0]
    value = data[kind]
    if not isinstance(value, str):
        raise BadInput(f"{kind} must be a string")
    num = data.get("num_captions", 1)
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 5:
        raise BadInput("num_captions must be a whole number from 1 to 5")
    flags = {}
    for name, default in (("store", True), ("refresh", False)):
        flags[name] = data.get(name, default)
        if not isinstance(flags[name], bool):
            raise BadInput(f"{name} must be true or false")
    ref = data.get("source_ref")
    if ref is not None and (not isinstance(ref, str) or not 0 < len(ref) <= 4096):
        raise BadInput("source_ref must be a string of 1 to 4096 characters")
    deadline = data.get("deadline")
    if deadline is not None and (
        not isinstance(deadline, int | float) or isinstance(deadline, bool) or not math.isfinite(deadline)
    ):
        raise BadInput("deadline must be a number: Unix time in seconds")
    return QueueRequest(
        kind,
        value,
        data.get("id"),
        check_prompt(data.get("prompt")),
        num,
        flags["store"],
        flags["refresh"],
        ref,
        None if deadline is None else float(deadline),
    )


def peek_id(body: bytes) -> Any:
    """The sender's `id` of a body that failed validation, when it has one (for the failed record)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str | int) else None


# "data:image/jpeg;base64," as a browser's FileReader.readAsDataURL writes it.
_DATA_URI = re.compile(r"data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)


def decode_b64(value: str) -> bytes:
    """image_b64 as clients write it: the standard or the URL-safe alphabet, padded or not,
    wrapped in lines (`base64 photo.jpg`, MIME, Python's encodebytes) or as a data: URI. Anything
    else outside the alphabet is refused, not skipped: a truncated or mangled image would
    otherwise be captioned as whatever its bytes still decode to."""
    head = _DATA_URI.match(value)
    text = value[head.end() :] if head else value
    try:
        data = text.encode("ascii").translate(None, b" \t\r\n")
        data += b"=" * (-len(data) % 4)
        return base64.b64decode(data, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(
            "image_b64 is not valid base64 (the standard or URL-safe alphabet; line breaks and a data: prefix are fine)"
        ) from None

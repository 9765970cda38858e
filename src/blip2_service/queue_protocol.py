"""The queue's message formats (CONTRACT §3), shared by the consumer and the publisher.

Pure functions: parse a request body, build a result body. No AMQP here.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from .domain import CaptionResult, PermanentError

IMAGE_FIELDS = ("path", "url", "image_b64")
DEAD_SUFFIX = ".dead"
REASON_HEADER = "x-blip2-error"


class BadRequestMessage(PermanentError):
    status = 400


@dataclass(frozen=True, slots=True)
class QueueRequest:
    kind: str  # "path" | "url" | "image_b64"
    value: str
    id: Any = None
    prompt: str | None = None

    def echo(self) -> dict[str, Any]:
        """The request as echoed in results: its id and input (embedded bytes summarised)."""
        shown = self.value if self.kind != "image_b64" else f"<{len(self.value)} base64 characters>"
        out: dict[str, Any] = {"id": self.id, self.kind: shown}
        if self.prompt:
            out["prompt"] = self.prompt
        return out


def parse_request(body: bytes | str) -> QueueRequest:
    """Validate a request body; BadRequestMessage says what is wrong (never retried)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestMessage(f"The message body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequestMessage("The message body must be a JSON object with one of path, url, image_b64")
    present = [f for f in IMAGE_FIELDS if data.get(f) not in (None, "")]
    if len(present) != 1:
        which = ", ".join(present) if present else "none"
        raise BadRequestMessage(f"Exactly one of path, url, image_b64 is needed; the message has {which}")
    kind = present[0]
    value = data[kind]
    if not isinstance(value, str):
        raise BadRequestMessage(f"{kind} must be a string")
    prompt = data.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 500):
        raise BadRequestMessage("prompt must be a string of at most 500 characters")
    return QueueRequest(kind, value, data.get("id"), prompt or None)


def decode_b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestMessage("image_b64 is not valid base64") from None


def result_body(
    result: CaptionResult | None,
    *,
    framework: str,
    request: dict[str, Any] | None,
    error: str | None = None,
) -> dict[str, Any]:
    """The legacy success or error body plus `request`, `record_id` and `image_sha256`."""
    if result is not None and result.ok:
        body: dict[str, Any] = {
            "service": "blip2",
            "status": "success",
            "predictions": [p.as_dict() for p in result.predictions],
            "metadata": {
                "processing_time": round(result.processing_time, 3),
                "model_info": {"framework": framework, "name": result.model},
                "cached": result.cached,
            },
        }
    else:
        message = error or (result.error if result is not None else None) or "failed"
        body = {
            "service": "blip2",
            "status": "error",
            "predictions": [],
            "error": {"message": message},
            "metadata": {"processing_time": round(result.processing_time, 3) if result else 0.0},
        }
    body["request"] = request
    body["record_id"] = result.record_id if result is not None else None
    body["image_sha256"] = result.image_sha256 if result is not None else None
    return body

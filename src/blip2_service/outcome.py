"""The one way out: a finished request as the legacy HTTP body, the queue result, or the CLI line.

Every door reports through these, so the legacy JSON shape (CONTRACT §1) is built in one place:
success `{"service","status":"success","predictions","metadata"}`, error
`{"service","status":"error","predictions":[],"error":{"message"},"metadata"}`.
"""

from __future__ import annotations

from typing import Any

from .domain import CaptionResult

SERVICE = "blip2"


def success_body(result: CaptionResult, framework: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "processing_time": round(result.processing_time, 3),
        "model_info": {"framework": framework, "name": result.model},
        "cached": result.cached,
        "image_sha256": result.image_sha256,
    }
    if result.record_id is not None:
        metadata["record_id"] = result.record_id
    return {
        "service": SERVICE,
        "status": "success",
        "predictions": [p.as_dict() for p in result.predictions],
        "metadata": metadata,
    }


def error_body(message: str, processing_time: float, **extra: Any) -> dict[str, Any]:
    return {
        "service": SERVICE,
        "status": "error",
        "predictions": [],
        "error": {"message": message},
        "metadata": {"processing_time": round(processing_time, 3), **extra},
    }


def queue_result(
    result: CaptionResult | None, *, framework: str, request: dict[str, Any] | None, error: str | None = None
) -> dict[str, Any]:
    """The queue's result message: the legacy body plus `request`, `record_id` and `image_sha256`."""
    if result is not None and result.ok:
        body = success_body(result, framework)
    else:
        message = error or (result.error if result is not None else None) or "failed"
        body = error_body(message, result.processing_time if result is not None else 0.0)
        # The HTTP status this failure maps to: a gateway answers its client with it.
        body["error_status"] = (result.error_status if result is not None else None) or 422
    body["request"] = request
    body["record_id"] = result.record_id if result is not None else None
    body["image_sha256"] = result.image_sha256 if result is not None else None
    return body


def cli_line(path: str, result: CaptionResult | BaseException) -> dict[str, Any]:
    """One JSON line of `blip2-service caption`."""
    if isinstance(result, BaseException):
        return {"path": path, "status": "failed", "error": getattr(result, "message", None) or str(result)}
    return {
        "path": path,
        "status": result.status,
        "text": result.text,
        "emoji_mappings": [m.as_dict() for m in result.predictions[0].emoji_mappings] if result.ok else [],
        "record_id": result.record_id,
        "image_sha256": result.image_sha256,
        "cached": result.cached,
        "error": result.error,
    }

"""The legacy JSON bodies, byte-for-byte in shape: clients of the old service parse these."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..domain import CaptionResult

SERVICE = "blip2"
NO_INPUT = "Must provide either url or file parameter, or POST a file"


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
    metadata: dict[str, Any] = {"processing_time": round(processing_time, 3), **extra}
    return {
        "service": SERVICE,
        "status": "error",
        "predictions": [],
        "error": {"message": message},
        "metadata": metadata,
    }


def error_response(
    status: int, message: str, processing_time: float = 0.0, *, retry_after: float | None = None, **extra: Any
) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.json_response(
        error_body(message, processing_time, **extra),
        status=status,
        headers=headers,
        dumps=_dumps,
    )


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(obj: Any) -> str:
    import json

    # Emojis as themselves, not \ud83d escapes: humans read these bodies too.
    return json.dumps(obj, ensure_ascii=False)

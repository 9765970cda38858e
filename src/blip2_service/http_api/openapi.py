"""The OpenAPI 3 description of every route, kept next to the routes it describes."""

from __future__ import annotations

from typing import Any

_ANALYZE_PARAMS: list[dict[str, Any]] = [
    {"name": "url", "in": "query", "schema": {"type": "string"}, "description": "Image URL to fetch"},
    {
        "name": "file",
        "in": "query",
        "schema": {"type": "string"},
        "description": "Local path inside FILE_ROOTS",
    },
    {
        "name": "prompt",
        "in": "query",
        "schema": {"type": "string", "maxLength": 500},
        "description": "Text prompt or question (BLIP-2)",
    },
    {"name": "num_captions", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 5}},
    {"name": "store", "in": "query", "schema": {"type": "boolean", "default": True}},
    {"name": "refresh", "in": "query", "schema": {"type": "boolean", "default": False}},
]

_ERRORS = {
    str(code): {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for code, text in {
        400: "bad or missing parameters",
        401: "missing or wrong API key",
        403: "path or URL refused",
        404: "file not found",
        413: "image over the limit",
        415: "not a supported image",
        422: "image cannot be decoded",
        502: "URL could not be fetched",
        503: "model not ready or overloaded",
    }.items()
}

_ANALYZE_OK = {
    "200": {
        "description": "caption",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Analysis"}}},
    },
    **_ERRORS,
}


def _get(summary: str, params: list[dict[str, Any]], responses: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "parameters": params, "responses": responses}


def _analyze_ops() -> dict[str, Any]:
    upload = {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    }
    return {
        "get": _get("Caption the image at ?url= or ?file=", _ANALYZE_PARAMS, _ANALYZE_OK),
        "post": {
            "summary": "Caption an uploaded image",
            "parameters": _ANALYZE_PARAMS[2:],
            "requestBody": upload,
            "responses": _ANALYZE_OK,
        },
    }


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def openapi_document(version: str) -> dict[str, Any]:
    caption_filters = [
        {"name": name, "in": "query", "schema": schema}
        for name, schema in [
            ("q", {"type": "string"}),
            ("source", {"enum": ["http", "watch", "queue", "cli"]}),
            ("model", {"type": "string"}),
            ("status", {"enum": ["succeeded", "failed"]}),
            ("path", {"type": "string"}),
            ("since", {"type": "string", "format": "date-time"}),
            ("until", {"type": "string", "format": "date-time"}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
            ("cursor", {"type": "string"}),
        ]
    ]
    sha = [
        {
            "name": "sha256",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        }
    ]
    return {
        "openapi": "3.0.3",
        "info": {"title": "blip2-service", "version": version},
        "paths": {
            "/health": {
                "get": _get(
                    "Model and service state",
                    [],
                    {"200": {"description": "healthy"}, "503": {"description": "loading or failed"}},
                )
            },
            "/analyze": _analyze_ops(),
            "/v3/analyze": _analyze_ops(),
            "/v2/analyze": {
                "get": _get(
                    "Legacy: caption ?image_url=",
                    [{"name": "image_url", "in": "query", "schema": {"type": "string"}}],
                    _ANALYZE_OK,
                )
            },
            "/v2/analyze_file": {
                "get": _get(
                    "Legacy: caption ?file_path=",
                    [{"name": "file_path", "in": "query", "schema": {"type": "string"}}],
                    _ANALYZE_OK,
                )
            },
            "/captions": {
                "get": _get(
                    "Stored captions, newest first",
                    caption_filters,
                    {
                        "200": {"description": "a page", **_json("CaptionPage")},
                        "400": {"description": "bad filter"},
                    },
                )
            },
            "/captions/{id}": {
                "get": _get(
                    "One stored caption",
                    [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    {
                        "200": {"description": "the caption", **_json("Caption")},
                        "404": {"description": "absent"},
                    },
                )
            },
            "/images/{sha256}": {
                "get": _get(
                    "An image's locations and captions",
                    sha,
                    {"200": {"description": "the image"}, "404": {"description": "absent"}},
                )
            },
            "/images/{sha256}/thumbnail": {
                "get": _get(
                    "A small JPEG of the image",
                    sha,
                    {"200": {"description": "JPEG"}, "404": {"description": "absent"}},
                )
            },
            "/metrics": {"get": _get("Prometheus metrics", [], {"200": {"description": "text format"}})},
            "/openapi.json": {"get": _get("This document", [], {"200": {"description": "OpenAPI 3"}})},
            "/": {"get": _get("Web page: recent captions, search, live updates", [], {"200": {"description": "HTML"}})},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "EmojiMapping": {
                    "type": "object",
                    "properties": {"emoji": {"type": "string"}, "word": {"type": "string"}},
                },
                "Prediction": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "emoji_mappings": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/EmojiMapping"},
                        },
                    },
                },
                "Analysis": {
                    "type": "object",
                    "required": ["service", "status", "predictions", "metadata"],
                    "properties": {
                        "service": {"type": "string"},
                        "status": {"type": "string"},
                        "predictions": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Prediction"},
                        },
                        "metadata": {"type": "object"},
                    },
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "service": {"type": "string"},
                        "status": {"type": "string"},
                        "predictions": {"type": "array"},
                        "error": {"type": "object", "properties": {"message": {"type": "string"}}},
                        "metadata": {"type": "object"},
                    },
                },
                "Caption": {
                    "type": "object",
                    "properties": {
                        k: {"type": "string"}
                        for k in (
                            "image_sha256",
                            "source",
                            "source_ref",
                            "model",
                            "text",
                            "status",
                            "error",
                            "created_at",
                        )
                    }
                    | {
                        "id": {"type": "integer"},
                        "processing_time": {"type": "number"},
                        "emoji_mappings": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/EmojiMapping"},
                        },
                    },
                },
                "CaptionPage": {
                    "type": "object",
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Caption"}},
                        "next_cursor": {"type": "string", "nullable": True},
                    },
                },
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }

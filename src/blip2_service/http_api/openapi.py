"""The OpenAPI 3.1 description of every route, precise enough to generate a correct client.

Kept next to the routes it describes, and held to them in CI: it validates as OpenAPI 3.1
(openapi-spec-validator) and schemathesis fuzzes the running server against it, statefully too
(a caption's `record_id` and `image_sha256` lead to /captions/{id} and /images/{sha256}).
"""

from __future__ import annotations

from typing import Any

from ..imaging import FORMAT_NAMES
from ..intake import MAX_PATH_CHARS, MAX_PROMPT_CHARS
from ..store.repository import MAX_ID

_REF = "#/components/schemas/"


def _schema(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _schema(schema)}}}


# What each status means, whatever the route; an analyze route answers in the legacy Error shape,
# the others in the Problem shape.
_MEANING = {
    400: "bad, missing or conflicting parameters; a malformed body; a prompt too long for the model",
    401: "API_KEY is set and the key is missing or wrong",
    403: "a path outside FILE_ROOTS, or a URL to a refused address",
    404: "not found",
    408: "the request body did not arrive within REQUEST_TIMEOUT",
    413: "a body, file, download or pixel count over MAX_FILE_SIZE / MAX_IMAGE_PIXELS",
    415: f"not a supported image ({FORMAT_NAMES}; HEIC with the heif extra), a ?url= that serves a web "
    "page, or an unsupported Content-Type",
    422: "an image that cannot be decoded (stored as failed)",
    502: "the URL could not be fetched; behind a gateway (INFERENCE=queue) also: a worker's reply could not be "
    "read (a worker of another version)",
    503: "the model failed, is still loading after LOAD_WAIT_SECONDS, the store is down, or the service is "
    "overloaded (MAX_PENDING, MAX_CONNECTIONS); behind a gateway (INFERENCE=queue) also: the broker is out "
    "of reach, no worker consumes, or none answered within GATEWAY_TIMEOUT; Retry-After says when to try again",
}


def _errors(codes: tuple[int, ...], schema: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        response = _json(_MEANING[code], schema)
        if code == 503:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        out[str(code)] = response
    return out


_OPTIONS = {
    "prompt": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_PROMPT_CHARS,
        "pattern": "^[^\\x00]+$",
        "description": "Text prompt or question (BLIP-2), without NUL; also bounded by the model's room in tokens",
    },
    "num_captions": {"type": "integer", "minimum": 1, "maximum": 5, "default": 1},
    "store": {"type": "boolean", "default": True},
    "refresh": {"type": "boolean", "default": False},
}
_OPTION_PARAMS = [
    {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in _OPTIONS.items()
]
_URL = {"type": "string", "format": "uri", "pattern": "^https?://[^/?#@]+", "maxLength": 2048}
_PATH = {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": "^[^\\x00]+$"}

# ISO 8601 date-time, or empty (no bound); past year 9999 (or before year 1) in UTC is clamped.
_TIME = {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]}

_GET_ERRORS = (400, 401, 403, 404, 413, 415, 422, 502, 503)
_POST_ERRORS = (400, 401, 408, 413, 415, 422, 502, 503)


def _analysis_links() -> dict[str, Any]:
    return {
        "GetCaption": {
            "operationId": "getCaption",
            "parameters": {"id": "$response.body#/metadata/record_id"},
            "description": "The stored caption of this answer",
        },
        "GetImage": {
            "operationId": "getImage",
            "parameters": {"sha256": "$response.body#/metadata/image_sha256"},
            "description": "Everything known about this image",
        },
    }


def _analyze_get(operation_id: str, summary: str, source_params: list[dict[str, Any]]) -> dict[str, Any]:
    ok = _json("the caption, in the legacy shape", "Analysis")
    ok["links"] = _analysis_links()
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": source_params + _OPTION_PARAMS,
        "responses": {"200": ok, **_errors(_GET_ERRORS, "Error")},
    }


def _analyze_ops(prefix: str) -> dict[str, Any]:
    # Exactly one of url and file: one form-exploded query object whose schema says so.
    source = {
        "name": "source",
        "in": "query",
        "required": True,
        "style": "form",
        "explode": True,
        "description": "Exactly one of `url` (an image to fetch) and `file` (a path inside FILE_ROOTS)",
        "schema": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"url": _URL},
                    "required": ["url"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"file": _PATH},
                    "required": ["file"],
                    "additionalProperties": False,
                },
            ]
        },
    }
    binary = {"type": "string", "contentMediaType": "application/octet-stream", "minLength": 1}
    upload = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": (
                        "The image in `file`; the options may come as fields too, before or after it "
                        "(an option in both the query and the form must have one value, else 400); "
                        "other fields are ignored, as the legacy service ignored them"
                    ),
                    "properties": {
                        "file": {"type": "string", "contentMediaType": "image/*", "minLength": 1},
                        **_OPTIONS,
                    },
                    "required": ["file"],
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "image/jpeg": {"schema": binary},
            "image/png": {"schema": binary},
            "application/octet-stream": {"schema": binary},
        },
    }
    ok = _json("the caption, in the legacy shape", "Analysis")
    ok["links"] = _analysis_links()
    return {
        "get": _analyze_get(f"{prefix}AnalyzeUrlOrFile", "Caption the image at ?url= or ?file=", [source]),
        "post": {
            "operationId": f"{prefix}AnalyzeUpload",
            "summary": "Caption an uploaded image (multipart field `file`, or the raw image as the body)",
            "parameters": _OPTION_PARAMS,
            "requestBody": upload,
            "responses": {"200": ok, **_errors(_POST_ERRORS, "Error")},
        },
    }


def _plain(operation_id: str, summary: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": summary, "content": content}},
        }
    }


def openapi_document(version: str) -> dict[str, Any]:
    caption_filters: list[dict[str, Any]] = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in [
            (
                "q",
                {
                    "type": "string",
                    "maxLength": 500,
                    "description": "full text over caption and emoji words (the last word a prefix); "
                    "emojis in it (🐶) must be among the caption's emojis",
                },
            ),
            ("source", {"type": "string", "enum": ["", "http", "watch", "queue", "cli"], "description": "empty: any"}),
            ("model", {"type": "string", "maxLength": 200}),
            ("status", {"type": "string", "enum": ["", "succeeded", "failed"], "description": "empty: any"}),
            ("path", {"type": "string", "maxLength": MAX_PATH_CHARS, "description": "prefix of a place it was seen"}),
            ("since", _TIME),
            ("until", _TIME),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
            (
                "cursor",
                {
                    "type": "string",
                    "pattern": "^[0-9]{1,19}$",
                    "description": "the `next_cursor` of the previous page, unchanged",
                },
            ),
        ]
    ]
    sha = {
        "name": "sha256",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
    }
    stored_errors = _errors((401, 503), "Problem")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "blip2-service",
            "version": version,
            "description": "Image captions from BLIP-2 and BLIP with emoji mappings; a drop-in for the legacy "
            "BLIP/BLIP2 service (same routes and JSON) plus stored results.",
        },
        "paths": {
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Model and store state (details with the key or HEALTH_DETAILS=true)",
                    "security": [],
                    "responses": {
                        "200": _json("healthy", "Health"),
                        "503": _json(
                            "model loading, warming or failed, the store or broker down, no worker (gateway), "
                            "or (consume / watch on HEALTH_PORT) its consumer or watcher not doing its work",
                            "Health",
                        ),
                    },
                }
            },
            "/analyze": _analyze_ops("legacy"),
            "/v3/analyze": _analyze_ops("v3"),
            "/v2/analyze": {
                "get": _analyze_get(
                    "v2AnalyzeUrl",
                    "Legacy name: caption the image at ?image_url=",
                    [{"name": "image_url", "in": "query", "required": True, "schema": _URL}],
                )
            },
            "/v2/analyze_file": {
                "get": _analyze_get(
                    "v2AnalyzeFile",
                    "Legacy name: caption the image at ?file_path=",
                    [{"name": "file_path", "in": "query", "required": True, "schema": _PATH}],
                )
            },
            "/captions": {
                "get": {
                    "operationId": "listCaptions",
                    "summary": "Stored captions, newest first",
                    "parameters": caption_filters,
                    "responses": {
                        "200": _json("a page", "CaptionPage"),
                        "400": _json("a filter out of its bounds, or a cursor that is not one", "Problem"),
                        **stored_errors,
                    },
                }
            },
            "/captions/{id}": {
                "get": {
                    "operationId": "getCaption",
                    "summary": "One stored caption",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                        }
                    ],
                    "responses": {
                        "200": _json("the caption", "Caption"),
                        "400": _json("an id that is not a whole number", "Problem"),
                        "404": _json("no caption with this id", "Problem"),
                        **stored_errors,
                    },
                }
            },
            "/images/{sha256}": {
                "get": {
                    "operationId": "getImage",
                    "summary": "An image's size, every place it was seen, every caption of it",
                    "parameters": [sha],
                    "responses": {
                        "200": _json("the image", "Image"),
                        "400": _json("not 64 hex digits", "Problem"),
                        "404": _json("no image with this sha256", "Problem"),
                        **stored_errors,
                    },
                }
            },
            "/images/{sha256}/thumbnail": {
                "get": {
                    "operationId": "getThumbnail",
                    "summary": "A small JPEG of the image (what the web page shows)",
                    "parameters": [sha],
                    "responses": {
                        "200": {
                            "description": "JPEG",
                            "content": {"image/jpeg": {"schema": {"type": "string", "contentMediaType": "image/jpeg"}}},
                        },
                        "400": _json("not 64 hex digits", "Problem"),
                        "404": _json("no thumbnail for this sha256", "Problem"),
                        **stored_errors,
                    },
                }
            },
            "/images/{sha256}/caption": {
                "post": {
                    "operationId": "captionImageAgain",
                    "summary": "Caption a stored image again with the current model and settings, from a place it "
                    "was seen whose file is still readable inside FILE_ROOTS",
                    "parameters": [sha],
                    "responses": {
                        "200": _json("the new caption, in the legacy shape", "Analysis"),
                        "400": _json("not 64 hex digits", "Problem"),
                        "404": _json("no image with this sha256", "Problem"),
                        "409": _json("no readable copy of the image is left", "Problem"),
                        "413": _json("the file grew over MAX_FILE_SIZE", "Problem"),
                        **stored_errors,
                    },
                }
            },
            "/metrics": _plain("metrics", "Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
            "/openapi.json": _plain("openapi", "This document", {"application/json": {"schema": {"type": "object"}}}),
            "/": _plain(
                "page", "Web page: recent captions, search, live updates", {"text/html": {"schema": {"type": "string"}}}
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API_KEY as a bearer token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": _schemas(),
        },
        # No key needed unless the service sets API_KEY; then either scheme.
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }


def _schemas() -> dict[str, Any]:
    emoji = {
        "type": "object",
        "required": ["emoji", "word"],
        "properties": {"emoji": {"type": "string"}, "word": {"type": "string"}},
    }
    emojis = {"type": "array", "items": _schema("EmojiMapping")}
    nullable_str = {"type": ["string", "null"]}
    return {
        "EmojiMapping": emoji,
        "Prediction": {
            "type": "object",
            "required": ["text", "emoji_mappings"],
            "properties": {"text": {"type": "string"}, "emoji_mappings": emojis},
        },
        "Analysis": {
            "type": "object",
            "required": ["service", "status", "predictions", "metadata"],
            "properties": {
                "service": {"const": "blip2"},
                "status": {"const": "success"},
                "predictions": {"type": "array", "minItems": 1, "items": _schema("Prediction")},
                "metadata": {
                    "type": "object",
                    "required": ["processing_time", "model_info"],
                    "properties": {
                        "processing_time": {"type": "number", "minimum": 0},
                        "model_info": {
                            "type": "object",
                            "required": ["framework"],
                            "properties": {"framework": {"type": "string"}, "name": {"type": "string"}},
                        },
                        "cached": {"type": "boolean"},
                        "image_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        "record_id": {"type": "integer"},
                    },
                },
            },
        },
        "Error": {
            "type": "object",
            "required": ["service", "status", "predictions", "error", "metadata"],
            "properties": {
                "service": {"const": "blip2"},
                "status": {"const": "error"},
                "predictions": {"type": "array", "maxItems": 0},
                "error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string", "minLength": 1}},
                },
                "metadata": {
                    "type": "object",
                    "required": ["processing_time"],
                    "properties": {"processing_time": {"type": "number", "minimum": 0}},
                },
            },
        },
        "Problem": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string", "minLength": 1}},
                }
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "model_status", "device", "store"],
            "properties": {
                "status": {"enum": ["healthy", "unhealthy"]},
                "model_status": {
                    "enum": ["loading", "warming", "loaded", "failed", "gateway", "none"],
                    "description": "gateway: INFERENCE=queue, the workers hold the model; none: a publishing "
                    "watcher's HEALTH_PORT (it loads no model)",
                },
                "workers": {"type": "integer", "minimum": 0},
                "unavailable": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "what makes it unhealthy: store, broker, workers (gateway); queue, watch "
                    "(consume / watch on HEALTH_PORT: not started, a folder gone, publishing failing)",
                },
                "device": {"type": "string"},
                "model": {"type": "string"},
                "version": {"type": "string"},
                "store": {"enum": ["up", "down"]},
                "error": {"type": "string"},
            },
        },
        "Caption": {
            "type": "object",
            "required": ["id", "image_sha256", "source", "source_ref", "model", "text", "status", "created_at"],
            "properties": {
                "id": {"type": "integer"},
                "image_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "source": {"enum": ["http", "watch", "queue", "cli"]},
                "source_ref": {"type": "string"},
                "model": {"type": "string"},
                "text": {"type": "string"},
                "texts": {"type": "array", "items": {"type": "string"}},
                "emoji_mappings": emojis,
                "status": {"enum": ["succeeded", "failed"]},
                "error": nullable_str,
                "processing_time": {"type": "number"},
                "settings": {"type": "object"},
                "created_at": {"type": "string", "format": "date-time"},
            },
        },
        "CaptionPage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": _schema("Caption")}, "next_cursor": nullable_str},
        },
        "Image": {
            "type": "object",
            "required": ["sha256", "byte_size", "locations", "captions"],
            "properties": {
                "sha256": {"type": "string"},
                "width": {"type": ["integer", "null"]},
                "height": {"type": ["integer", "null"]},
                "format": nullable_str,
                "byte_size": {"type": "integer"},
                "first_seen_at": {"type": "string", "format": "date-time"},
                "locations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["source", "source_ref"],
                        "properties": {
                            "source": {"type": "string"},
                            "source_ref": {"type": "string"},
                            "first_seen_at": {"type": "string", "format": "date-time"},
                            "last_seen_at": {"type": "string", "format": "date-time"},
                            "gone_at": {"type": ["string", "null"], "format": "date-time"},
                        },
                    },
                },
                "captions": {"type": "array", "items": _schema("Caption")},
            },
        },
    }

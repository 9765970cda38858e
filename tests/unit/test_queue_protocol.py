"""The queue's message formats: what a client may send as image_b64, and a gateway's deadline."""

from __future__ import annotations

import base64
import json

import pytest

from blip2_service.domain import BadInput
from blip2_service.queue_protocol import decode_b64, parse_request

from ..conftest import image_bytes

IMAGE = image_bytes(5, size=(64, 48))


@pytest.mark.parametrize(
    "spelled",
    [
        base64.b64encode(IMAGE).decode(),
        base64.encodebytes(IMAGE).decode(),  # MIME lines of 76, as `base64 photo.jpg` writes them
        base64.encodebytes(IMAGE).decode().replace("\n", "\r\n"),
        base64.urlsafe_b64encode(IMAGE).decode(),
        base64.urlsafe_b64encode(IMAGE).decode().rstrip("="),  # URL-safe without padding (JWT style)
        "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode(),  # FileReader.readAsDataURL
    ],
    ids=["standard", "wrapped", "wrapped-crlf", "url-safe", "unpadded", "data-uri"],
)
def test_image_b64_is_read_as_clients_write_it(spelled: str) -> None:
    assert decode_b64(spelled) == IMAGE


@pytest.mark.parametrize(
    "mangled",
    ["%%%", base64.b64encode(IMAGE).decode()[:-8] + "!" + "A" * 7, "é" * 8, "A", "data:image/jpeg,notbase64"],
    ids=["symbols", "a-stray-character", "non-ascii", "too-short", "data-uri-not-base64"],
)
def test_anything_else_outside_the_alphabet_is_refused_with_one_line(mangled: str) -> None:
    with pytest.raises(BadInput, match="image_b64 is not valid base64"):
        decode_b64(mangled)


@pytest.mark.parametrize("deadline", [1_800_000_000, 1_800_000_000.25])
def test_a_deadline_is_unix_seconds(deadline: float) -> None:
    body = json.dumps({"path": "/a.jpg", "deadline": deadline})
    assert parse_request(body).deadline == deadline
    assert parse_request(json.dumps({"path": "/a.jpg"})).deadline is None


@pytest.mark.parametrize("deadline", ["soon", True, [1], "NaN", 1e400])
def test_a_deadline_that_is_not_a_number_is_refused_with_one_line(deadline: object) -> None:
    body = json.dumps({"path": "/a.jpg", "deadline": deadline})  # 1e400 is written as Infinity
    with pytest.raises(BadInput, match="deadline must be a number"):
        parse_request(body)

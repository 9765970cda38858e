"""BLIP (v1) goes through the same loader and captioner: a tiny random BLIP saved and loaded back."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from blip2_service.captioner import Captioner, load_model
from blip2_service.captioner.tiny import build_tiny_random_blip
from blip2_service.domain import GenerationSettings

from ..conftest import image_bytes


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random_blip(tmp_path_factory.mktemp("blip") / "tiny-random-blip")


def test_a_blip_checkpoint_loads_and_captions_batched_like_single(tiny_blip: Path) -> None:
    loaded = load_model(str(tiny_blip), device="cpu", dtype="float32", allow_download=False)
    assert loaded.kind == "blip" and loaded.framework.startswith("BLIP (")
    captioner = Captioner(loaded)
    pixels = [captioner.preprocess(Image.open(io.BytesIO(image_bytes(i))).convert("RGB")) for i in range(4)]
    settings = [GenerationSettings(num_beams=1, max_new_tokens=6)] * 4
    batched = captioner.caption_batch(pixels, settings)
    assert batched == [captioner.caption_batch([p], [s])[0] for p, s in zip(pixels, settings, strict=True)]
    assert all(len(c) == 1 and isinstance(c[0], str) for c in batched)
    prompted = captioner.caption_batch(
        pixels[:2], [GenerationSettings(num_beams=1, max_new_tokens=6, prompt="a picture of")] * 2
    )
    assert all(not c[0].startswith("a picture of") for c in prompted)  # the prompt is not echoed back


def test_tiny_random_blip_is_a_model_name(data_dir: Path) -> None:
    loaded = load_model("tiny-random-blip", device="cpu", dtype="float32", data_dir=data_dir)
    assert loaded.kind == "blip" and (data_dir / "models" / "tiny-random-blip" / "config.json").exists()

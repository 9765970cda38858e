"""Every model family the README names, through the same checks: BLIP-2 OPT (decoder-only),
BLIP-2 Flan-T5 (encoder-decoder) and BLIP v1, each a small random checkpoint built offline, saved
and loaded through from_pretrained like a downloaded one."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blip2_service.captioner import Captioner, LoadedModel, load_model
from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import cpu_has_native_bf16
from blip2_service.domain import GenerationSettings

from ..conftest import image_bytes

FAMILIES = {
    # name: (kind, encoder-decoder language model)
    "tiny-random": ("blip2", False),
    "tiny-random-t5": ("blip2", True),
    "tiny-random-blip": ("blip", False),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, data_dir: Path) -> tuple[str, LoadedModel]:
    name = str(request.param)
    return name, load_model(name, data_dir=data_dir, dtype="float32", device="cpu")


def _pixels(captioner: Captioner, n: int, start: int) -> list[Any]:
    return [captioner.preprocess(Image.open(io.BytesIO(image_bytes(start + i))).convert("RGB")) for i in range(n)]


def test_each_family_loads_from_a_saved_folder(family: tuple[str, LoadedModel], data_dir: Path) -> None:
    name, loaded = family
    kind, encoder_decoder = FAMILIES[name]
    assert (data_dir / "models" / name / "config.json").exists()
    assert loaded.kind == kind
    text_config = loaded.model.config.text_config
    assert bool(text_config.is_encoder_decoder) is encoder_decoder


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_captions_equal_one_at_a_time(family: tuple[str, LoadedModel], beams: int) -> None:
    _name, loaded = family
    captioner = Captioner(loaded)
    pixels = _pixels(captioner, 5, start=300)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=8)] * 5
    batched = captioner.caption_batch(pixels, settings)
    assert batched == [captioner.caption_batch([p], [s])[0] for p, s in zip(pixels, settings, strict=True)]
    assert all(len(c) == 1 and isinstance(c[0], str) for c in batched)
    assert len({c[0] for c in batched}) > 1  # the image matters


@pytest.mark.parametrize("beams", [1, 3])
def test_prompts_caption_prefixes_and_questions_mixed_in_one_batch(family: tuple[str, LoadedModel], beams: int) -> None:
    name, loaded = family
    captioner = Captioner(loaded)
    prompts = [None, "a photo of", "Question: what is in the picture? Answer:", None, "a photo of"]
    pixels = _pixels(captioner, len(prompts), start=320)
    settings = [GenerationSettings(num_beams=beams, max_new_tokens=8, prompt=p) for p in prompts]
    batched = captioner.caption_batch(pixels, settings)
    assert batched == [captioner.caption_batch([p], [s])[0] for p, s in zip(pixels, settings, strict=True)]
    if FAMILIES[name][0] == "blip":
        assert not any(c[0].lower().startswith("a photo of") for c in batched)  # the prefix is not echoed


def test_num_captions_gives_that_many_sampled_alternatives(family: tuple[str, LoadedModel]) -> None:
    _name, loaded = family
    captioner = Captioner(loaded)
    out = captioner.caption_batch(
        _pixels(captioner, 2, start=340), [GenerationSettings(num_beams=1, max_new_tokens=8, num_captions=3)] * 2
    )
    assert [len(c) for c in out] == [3, 3] and all(isinstance(t, str) for c in out for t in c)


def test_bfloat16_where_this_cpu_runs_it(family: tuple[str, LoadedModel], data_dir: Path) -> None:
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16 (no AMX or AVX512-BF16): DTYPE=auto runs float32 here")
    name, _ = family
    loaded = load_model(name, data_dir=data_dir, dtype="bfloat16", device="cpu")
    captioner = Captioner(loaded)
    out = captioner.caption_batch(
        _pixels(captioner, 3, start=360), [GenerationSettings(num_beams=2, max_new_tokens=8)] * 3
    )
    assert len(out) == 3 and all(len(c) == 1 and isinstance(c[0], str) for c in out)


async def test_the_legacy_json_through_http(
    family: tuple[str, LoadedModel], service: Any, make_image: Callable[..., bytes]
) -> None:
    name, loaded = family
    holder = ModelHolder(lambda: loaded)
    holder.load_now()
    client = await service(holder=holder, num_beams=2, max_new_tokens=8)
    resp = await client.post("/v3/analyze", data=make_image(380), headers={"Content-Type": "image/jpeg"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["service"] == "blip2" and body["status"] == "success"
    prediction = body["predictions"][0]
    assert isinstance(prediction["text"], str) and isinstance(prediction["emoji_mappings"], list)
    assert body["metadata"]["model_info"]["name"] == name
    framework = body["metadata"]["model_info"]["framework"]
    assert framework.startswith("BLIP2" if FAMILIES[name][0] == "blip2" else "BLIP (")
    asked = await client.post(
        "/v3/analyze",
        params={"prompt": "Question: what is in the picture? Answer:"},
        data=make_image(381),
        headers={"Content-Type": "image/jpeg"},
    )
    assert asked.status == 200 and isinstance((await asked.json())["predictions"][0]["text"], str)

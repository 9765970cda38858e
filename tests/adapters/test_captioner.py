"""The real BLIP-2 code path (tiny-random checkpoint through from_pretrained): no mocks."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from blip2_service.captioner import Captioner, LoadedModel, ModelLoadError, load_model, resolve_model_id
from blip2_service.domain import GenerationSettings

from ..conftest import image_bytes


def _images(n: int, start: int = 0) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image_bytes(start + i))).convert("RGB") for i in range(n)]


@pytest.fixture(scope="module")
def captioner(tiny_model: LoadedModel) -> Captioner:
    return Captioner(tiny_model)


def test_tiny_random_is_a_saved_checkpoint_loaded_through_from_pretrained(
    tiny_model: LoadedModel, data_dir: Path
) -> None:
    folder = data_dir / "models" / "tiny-random"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert type(tiny_model.model).__name__ == "Blip2ForConditionalGeneration"
    assert tiny_model.processor.num_query_tokens == tiny_model.model.config.num_query_tokens
    assert tiny_model.model.config.image_token_index is not None
    assert tiny_model.processor.tokenizer.padding_side == "left"


def test_preprocess_gives_bit_for_bit_the_processors_model_input(captioner: Captioner, tiny_model: LoadedModel) -> None:
    """Resize on the worker, normalise on the device: the model must see exactly the processor's numbers."""
    import torch

    images = [*_images(3), Image.open(io.BytesIO(image_bytes(7, size=(640, 480)))).convert("RGB")]
    prepared = [captioner.preprocess(im) for im in images]
    size = tiny_model.model.config.vision_config.image_size
    assert captioner.pixels.fast and prepared[0].dtype == torch.uint8 and tuple(prepared[0].shape) == (size, size, 3)
    expected = tiny_model.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(captioner.pixels.batch(prepared), expected)


def test_captions_are_text_and_depend_on_the_image(captioner: Captioner) -> None:
    pixels = [captioner.preprocess(im) for im in _images(6)]
    out = captioner.caption_batch(pixels, [GenerationSettings(num_beams=1, max_new_tokens=8)] * 6)
    assert len(out) == 6 and all(len(c) == 1 for c in out)
    texts = [c[0] for c in out]
    assert all(t and t == t.strip() for t in texts)
    assert len(set(texts)) > 1  # the image matters: not the same caption for every input
    assert "<image>" not in " ".join(texts)  # the prompt ids were sliced off


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_captions_equal_one_at_a_time(captioner: Captioner, beams: int) -> None:
    pixels = [captioner.preprocess(im) for im in _images(5, start=10)]
    settings = GenerationSettings(num_beams=beams, max_new_tokens=10)
    batched = captioner.caption_batch(pixels, [settings] * 5)
    single = [captioner.caption_batch([p], [settings])[0] for p in pixels]
    assert batched == single


def test_mixed_prompts_batch_like_one_at_a_time(captioner: Captioner) -> None:
    pixels = [captioner.preprocess(im) for im in _images(4, start=20)]
    settings = [
        GenerationSettings(num_beams=1, max_new_tokens=6, prompt=p)
        for p in ("a photo of", None, "a dog on the beach next to", "question: what is it? answer:")
    ]
    batched = captioner.caption_batch(pixels, settings)
    single = [captioner.caption_batch([p], [s])[0] for p, s in zip(pixels, settings, strict=True)]
    assert batched == single
    # a prompt changes the conditioning, so the caption differs from the unprompted one
    unprompted = captioner.caption_batch([pixels[0]], [GenerationSettings(num_beams=1, max_new_tokens=6)])[0]
    assert batched[0] != unprompted


def test_num_captions_gives_that_many_sampled_alternatives(captioner: Captioner) -> None:
    pixels = [captioner.preprocess(im) for im in _images(2, start=30)]
    out = captioner.caption_batch(pixels, [GenerationSettings(num_captions=3, max_new_tokens=8)] * 2)
    assert [len(c) for c in out] == [3, 3]


def test_lavis_names_map_to_hugging_face_twins() -> None:
    assert resolve_model_id("blip2_opt:pretrain_opt2.7b") == "Salesforce/blip2-opt-2.7b"
    assert resolve_model_id("blip2_opt:caption_coco_opt2.7b") == "Salesforce/blip2-opt-2.7b-coco"
    assert resolve_model_id("blip2_t5:pretrain_flant5xl") == "Salesforce/blip2-flan-t5-xl"
    assert resolve_model_id("blip_caption:large_coco") == "Salesforce/blip-image-captioning-large"
    assert resolve_model_id("blip_caption:base_coco") == "Salesforce/blip-image-captioning-base"
    assert resolve_model_id("/models/mine") == "/models/mine"


def test_missing_weights_fail_with_where_we_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("blip2_opt:pretrain_opt2.7b", model_dir=tmp_path / "cache", allow_download=False, device="cpu")
    message = str(info.value)
    assert "Salesforce/blip2-opt-2.7b" in message
    assert str(tmp_path / "cache") in message
    assert "MODEL_DIR" in message and "MODEL_DOWNLOAD" in message
    assert "`hf download Salesforce/blip2-opt-2.7b`" in message and "huggingface-cli" not in message
    assert "LAVIS name" in message
    with pytest.raises(ModelLoadError) as folder:
        load_model(str(tmp_path / "my" / "model"), allow_download=False, device="cpu")
    assert "no folder with config.json" in str(folder.value) and "hf download " + str(tmp_path) not in str(folder.value)


def test_a_local_folder_loads_like_a_hub_id(tiny_model: LoadedModel, data_dir: Path) -> None:
    folder = data_dir / "models" / "tiny-random"
    loaded = load_model(str(folder), device="cpu", dtype="float32", allow_download=False)
    assert loaded.kind == "blip2"
    assert loaded.framework.startswith("BLIP2")


def test_a_checkpoint_without_num_query_tokens_is_refused(data_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir / "models" / "tiny-random", broken)
    config_path = broken / "processor_config.json"
    config = json.loads(config_path.read_text())
    config.pop("num_query_tokens", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_query_tokens"):
        load_model(str(broken), device="cpu", dtype="float32", allow_download=False)


def test_out_of_memory_splits_the_batch_instead_of_failing(captioner: Captioner, tiny_model: LoadedModel) -> None:
    """A GPU's out-of-memory cannot happen here: the one fake in the suite raises it past 2 images."""
    import torch

    pixels = [captioner.preprocess(im) for im in _images(6, start=40)]
    settings = [GenerationSettings(num_beams=1, max_new_tokens=6)] * 6
    expected = captioner.caption_batch(pixels, settings)
    real_generate = tiny_model.model.generate
    sizes: list[int] = []

    def small_memory_generate(*args: object, **kwargs: object) -> object:
        batch = kwargs["pixel_values"].shape[0]  # type: ignore[union-attr]
        sizes.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(*args, **kwargs)

    tiny_model.model.generate = small_memory_generate
    try:
        assert captioner.caption_batch(pixels, settings) == expected
    finally:
        tiny_model.model.generate = real_generate
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and sum(s for s in sizes if s <= 2) == 6


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, "bfloat16"),  # Xeon with AMX
        ({"avx512f", "avx512_bf16"}, "float32"),  # EPYC Zen 4/5, a Xeon with AMX hidden
        ({"avx2"}, "float32"),
    ],
)
def test_dtype_auto_on_a_cpu_is_bfloat16_only_with_amx(
    flags: set[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AVX512-BF16 alone, bf16 ran the vision tower and the prefill at half float32's speed
    (bench/RESULTS.md): DTYPE=auto once picked it there and made the default captioning slower."""
    import torch

    from blip2_service.captioner import loading

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # answer from the flags alone
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    monkeypatch.setattr(loading, "_cpu_flags", lambda: flags)
    assert loading.pick_dtype("auto", torch.device("cpu")) == getattr(torch, expected)
    assert loading.pick_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert loading.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked for: always given
    assert loading.cpu_has_native_bf16() == ("avx512_bf16" in flags)


def test_bf16_on_cpu_prepacks_linear_weights_without_changing_captions(data_dir: Path) -> None:
    import torch

    from blip2_service.captioner.cpu_prepack import mkldnn_bf16_supported, prepack_bf16_linears

    if not mkldnn_bf16_supported():
        pytest.skip("oneDNN runs no bf16 on this CPU (no AVX-512): prepacking is off here")
    dense = load_model("tiny-random", data_dir=data_dir, dtype="bfloat16", device="cpu")
    # load_model prepacks bf16 on CPU; undo-free check: a second, dense copy built by hand
    assert any(type(m).__name__ == "PrepackedLinear" for m in dense.model.modules())
    plain = load_model("tiny-random", data_dir=data_dir, dtype="float32", device="cpu")
    plain.model.to(torch.bfloat16)
    plain.dtype = torch.bfloat16
    pixels = [Captioner(plain).preprocess(im) for im in _images(4, start=60)]
    settings = [GenerationSettings(num_beams=2, max_new_tokens=8)] * 4
    expected = Captioner(plain).caption_batch(pixels, settings)
    assert prepack_bf16_linears(plain.model) > 0
    assert Captioner(plain).caption_batch(pixels, settings) == expected
    assert Captioner(dense).caption_batch(pixels, settings) == expected


def test_bf16_asked_for_on_a_cpu_without_native_bf16_still_captions(data_dir: Path) -> None:
    """DTYPE=bfloat16 on an AVX2-only CPU must caption (slowly), not crash in oneDNN."""
    import torch

    from blip2_service.captioner.cpu_prepack import mkldnn_bf16_supported

    loaded = load_model("tiny-random", data_dir=data_dir, dtype="bfloat16", device="cpu")
    packed = any(type(m).__name__ == "PrepackedLinear" for m in loaded.model.modules())
    assert packed == mkldnn_bf16_supported()
    assert loaded.dtype == torch.bfloat16
    captioner = Captioner(loaded)
    pixels = [captioner.preprocess(im) for im in _images(2, start=70)]
    captions = captioner.caption_batch(pixels, [GenerationSettings(max_new_tokens=6, min_new_tokens=6)] * 2)
    assert [len(c) for c in captions] == [1, 1] and all(c[0].split() for c in captions)


def test_cuda_attention_leaves_out_cudnn_and_cpu_is_untouched() -> None:
    """cuDNN attention re-plans at every new decode shape (bench/RESULTS.md, GPU); the switch must
    be scoped to `generate` and leave every other backend, and the CPU path, as they were."""
    import torch

    from blip2_service.captioner.generate import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before

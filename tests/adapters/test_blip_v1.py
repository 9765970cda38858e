"""BLIP (v1) goes through the same loader and captioner: a tiny random BLIP saved and loaded back."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from blip2_service.captioner import Captioner, load_model
from blip2_service.domain import GenerationSettings

from ..conftest import image_bytes


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor, PreTrainedTokenizerFast
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = [
        "a",
        "dog",
        "cat",
        "on",
        "the",
        "beach",
        "picture",
        "of",
        "man",
        "riding",
        "wave",
        "surfboard",
        "photo",
        "with",
    ]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([" ".join(words)] * 5, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    vocab = len(tokenizer)
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": sep,
            "eos_token_id": sep,
        },
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-blip")
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


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

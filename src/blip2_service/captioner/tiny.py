"""Build small random BLIP-2 checkpoints offline, saved and reloaded like real ones.

`tiny-random` lets tests and `make run` exercise the real model code
(`Blip2ForConditionalGeneration`, `Blip2Processor`, `generate`) where no
weights can be downloaded. `full-random` is BLIP-2 OPT-2.7b's published
shape with random weights, for honest speed measurements.

The known transformers 5.x traps are handled here and asserted at load:
the processor must know `num_query_tokens` (else it silently drops the
image), the config must carry `image_token_index`, and padding is on the left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# COCO-style captions: the tokenizer learns whole caption words from them, and
# generation is restricted to those word pieces so random captions read as
# (meaningless) words instead of stray bytes.
_CORPUS = """
a man riding a wave on top of a surfboard
a dog running on the beach with a frisbee
a plate of food with broccoli and rice
two people playing frisbee in a park
a cat sitting on a couch next to a laptop
a red double decker bus driving down a street
a giraffe standing next to a tree in a field
a woman holding an umbrella in the rain
a pizza with cheese and tomatoes on a table
a group of people standing around a kitchen
a train traveling down the tracks near a station
a bowl of fruit with bananas and apples
an elephant walking through the tall grass
a little girl eating a slice of cake
a man flying a kite on a sunny day
a herd of sheep grazing on a green hill
a horse pulling a cart down a dirt road
a baseball player swinging a bat at a ball
a bathroom with a toilet and a sink
a teddy bear sitting on a bed
a clock tower in the middle of a city
a boat floating on a lake near mountains
a skier going down a snowy slope
a person riding a motorcycle on the road
a bird perched on a branch of a tree
a cup of coffee and a donut on a plate
a stop sign on the corner of a street
an airplane flying in the blue sky
a zebra and a cow in a grassy field
a vase of flowers on a wooden table
a young boy holding a tennis racket
a bear walking in the snow
a hot dog with mustard on a bun
a couple of children playing soccer
a laptop computer and a keyboard on a desk
a pair of scissors and a book
""".strip().splitlines()

_SPECIALS = ["<pad>", "</s>", "<unk>"]

# BLIP-2's published vision tower (EVA ViT-g/14 at 224 px) and Q-Former, shared by every full build.
_EVA_VIT_G = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "qkv_bias": True,
}
_QFORMER = {"vocab_size": 30522, "encoder_hidden_size": 1408}


def _random_blip2(config: Any, *, dtype: Any, seed: int, device: Any) -> Any:
    """A BLIP-2 of `config`'s shapes with N(0, 0.02) weights, made directly on `device`: built on
    the meta device, then materialised and filled there (seconds on a GPU, not minutes)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    model = model.to(dtype or torch.float32).to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def _publish_dir(staging: Path, path: Path, marker_name: str, info: dict[str, Any]) -> Path:
    """Move a finished build into place atomically: a crash or a concurrent builder never
    leaves a half-written checkpoint where `from_pretrained` would find it."""
    (staging / marker_name).write_text(json.dumps(info))
    try:
        os.replace(staging, path)
    except OSError:
        if not (path / marker_name).exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return path


def _built(path: Path, marker_name: str) -> bool:
    """Whether a finished build is at `path`; a half-written one (an older version's) is removed."""
    if (path / marker_name).exists():
        return True
    if path.exists():
        shutil.rmtree(path)
    return False


def _staging(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))


def build_tiny_random(path: Path, *, seed: int = 0, image_size: int = 64, num_query_tokens: int = 8) -> Path:
    """Create the tiny checkpoint in `path` (idempotent: an existing build is reused)."""
    marker = path / "tiny-random.json"
    if _built(path, marker.name):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # it writes to stdout, which `caption` keeps for JSON lines
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    bos = tok.token_to_id("</s>")
    assert bos is not None
    # OPT prepends </s> as BOS; do the same so prompted and unprompted inputs line up.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    vocab_size = len(tokenizer)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")

    config = Blip2Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
        },
        qformer_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": vocab_size,
            "max_position_embeddings": 128,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "word_embed_proj_dim": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": bos,
            "eos_token_id": bos,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        # Default init is near zero: every image would give the same caption. A visible
        # scale makes the caption depend on the pixels, which tests rely on.
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.4)
    suppress = _non_word_tokens(tokenizer, keep={bos})
    model.generation_config.suppress_tokens = suppress
    model.generation_config.begin_suppress_tokens = [bos]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = bos

    staging = _staging(path)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    return _publish_dir(staging, path, marker.name, {"kind": "tiny-random", "seed": seed})


def _non_word_tokens(tokenizer: Any, keep: set[int]) -> list[int]:
    """Ids of every token but " word" for the corpus' words: random weights then write
    word salad from caption vocabulary ("dog beach umbrella") instead of stray bytes."""
    words = {w for line in _CORPUS for w in line.split()}
    suppressed = []
    for token_id in range(len(tokenizer)):
        if token_id in keep:
            continue
        text = tokenizer.decode([token_id])
        if not (text.startswith(" ") and text.strip() in words):
            suppressed.append(token_id)
    return suppressed


def make_full_random(
    *, dtype: Any = None, seed: int = 0, work_dir: Path | None = None, device: Any = "cpu"
) -> tuple[Any, Any]:
    """BLIP-2 OPT-2.7b's published architecture with random weights (about 3.9 B parameters), in memory.

    Only for benchmarks: the same shapes and FLOPs as the real checkpoint, no download.
    The tokenizer is the tiny one (ids past its vocabulary decode to nothing): the
    vocabulary only sizes the last matmul, which keeps OPT's 50272.
    """
    import tempfile as _tempfile

    from transformers import Blip2Config, Blip2Processor

    tiny_dir = build_tiny_random((work_dir or Path(_tempfile.gettempdir()) / "blip2-bench") / "tiny-random")
    processor = Blip2Processor.from_pretrained(tiny_dir)
    processor.num_query_tokens = 32
    processor.image_processor.size = {"height": 224, "width": 224}
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=_EVA_VIT_G,
        qformer_config=_QFORMER,
        text_config={
            "model_type": "opt",
            "vocab_size": 50272,
            "hidden_size": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": 2560,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _random_blip2(config, dtype=dtype, seed=seed, device=device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, processor


def build_full_random(path: Path, *, seed: int = 0) -> Path:
    """`MODEL=full-random`: the in-memory build saved (bfloat16, about 8 GB) for `from_pretrained`."""
    marker = path / "full-random.json"
    if _built(path, marker.name):
        return path
    import torch

    model, processor = make_full_random(dtype=torch.bfloat16, seed=seed, work_dir=path.parent)
    staging = _staging(path)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    return _publish_dir(staging, path, marker.name, {"kind": "full-random", "seed": seed})


def _blip_tokenizer() -> Any:
    """A WordPiece tokenizer with BERT's special tokens, trained offline on the caption corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        _CORPUS * 4, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


def _build_blip(path: Path, marker_name: str, vision: dict[str, Any], text: dict[str, Any], std: float) -> Path:
    if _built(path, marker_name):
        return path
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = _blip_tokenizer()
    sep = tokenizer.sep_token_id
    text = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": sep,
        "eos_token_id": sep,
        **text,
    }
    config = BlipConfig(vision_config=vision, text_config=text)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
    size = int(vision["image_size"])
    staging = _staging(path)
    model.save_pretrained(staging)
    BlipProcessor(BlipImageProcessorPil(size={"height": size, "width": size}), tokenizer).save_pretrained(staging)
    return _publish_dir(staging, path, marker_name, {"kind": marker_name.removesuffix(".json")})


def build_tiny_random_blip(path: Path) -> Path:
    """`MODEL=tiny-random-blip`: BLIP (v1) captioning in miniature, for tests of that family."""
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    text = {
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    }
    return _build_blip(path, "tiny-random-blip.json", vision, text, std=0.3)


def build_blip_large_random(path: Path) -> Path:
    """`MODEL=blip-large-random`: BLIP large captioning's published shapes (the legacy service's
    `blip_caption:large_coco`, ViT-L/16 at 384 px and a 12-layer BERT decoder, about 470 M
    parameters) with random weights, so the legacy figure has a side-by-side number on one card.
    The vocabulary keeps BERT's 30,524 rows (it sizes the last matmul); ids past the tiny
    tokenizer decode to nothing."""
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
    }
    text = {
        "vocab_size": 30524,
        "hidden_size": 768,
        "encoder_hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
    }
    return _build_blip(path, "blip-large-random.json", vision, text, std=0.02)


def _t5_tokenizer() -> Any:
    """A Unigram tokenizer with T5's specials (<pad> 0, </s> 1, <unk> 2) appending </s>, as Flan-T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        _CORPUS * 4,
        trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
        ),
    )
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def _t5_blip2_config(processor: Any, text: dict[str, Any], vision: dict[str, Any], qformer: dict[str, Any]) -> Any:
    from transformers import Blip2Config

    tokenizer = processor.tokenizer
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config={
            "model_type": "t5",
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
            "feed_forward_proj": "gated-gelu",  # Flan-T5's
            "tie_word_embeddings": False,
            **text,
        },
        num_query_tokens=processor.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )


def _t5_processor(image_size: int, num_query_tokens: int) -> Any:
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, _t5_tokenizer(), num_query_tokens=num_query_tokens)


def _set_t5_generation(model: Any, tokenizer: Any) -> None:
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.decoder_start_token_id = tokenizer.pad_token_id
    config.bos_token_id = None


def build_tiny_random_t5(path: Path, *, seed: int = 0) -> Path:
    """`MODEL=tiny-random-t5`: BLIP-2 with a Flan-T5-shaped (encoder-decoder) language model in
    miniature, saved and loaded through from_pretrained like `tiny-random`."""
    marker = path / "tiny-random-t5.json"
    if _built(path, marker.name):
        return path
    import torch
    from transformers import Blip2ForConditionalGeneration

    processor = _t5_processor(image_size=64, num_query_tokens=8)
    vocab = len(processor.tokenizer)
    config = _t5_blip2_config(
        processor,
        text={
            "vocab_size": vocab,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
        },
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        qformer={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": vocab,
            "max_position_embeddings": 128,
        },
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.4)  # as tiny-random: the caption depends on the pixels
    _set_t5_generation(model, processor.tokenizer)
    staging = _staging(path)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    return _publish_dir(staging, path, marker.name, {"kind": "tiny-random-t5", "seed": seed})


def make_full_random_t5(*, dtype: Any = None, seed: int = 0, device: Any = "cpu") -> tuple[Any, Any]:
    """BLIP-2 Flan-T5-XL's published architecture with random weights (about 3.9 B parameters),
    in memory, for benchmarks. Vocabulary: Flan-T5's 32,128 rows; the tokenizer is the tiny one."""

    processor = _t5_processor(image_size=224, num_query_tokens=32)
    config = _t5_blip2_config(
        processor,
        text={
            "vocab_size": 32128,
            "d_model": 2048,
            "d_kv": 64,
            "d_ff": 5120,
            "num_layers": 24,
            "num_decoder_layers": 24,
            "num_heads": 32,
        },
        vision=_EVA_VIT_G,
        qformer=_QFORMER,
    )
    model = _random_blip2(config, dtype=dtype, seed=seed, device=device)
    _set_t5_generation(model, processor.tokenizer)
    model.eval()
    return model, processor


RANDOM_BUILDERS = {
    "tiny-random-t5": build_tiny_random_t5,
    "tiny-random": build_tiny_random,
    "full-random": build_full_random,
    "tiny-random-blip": build_tiny_random_blip,
    "blip-large-random": build_blip_large_random,
}

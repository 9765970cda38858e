"""What the tiny-random benches share: a loaded model holder and the bundled emoji mapper."""

from __future__ import annotations

from pathlib import Path

from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import load_model
from blip2_service.emoji import EmojiMapper, load_bundled


def tiny_model_and_mapper(data_dir: Path) -> tuple[ModelHolder, EmojiMapper]:
    holder = ModelHolder(lambda: load_model("tiny-random", data_dir=data_dir, device="cpu"))
    holder.load_now()
    table = load_bundled()
    return holder, EmojiMapper(table.table, table.stopwords)

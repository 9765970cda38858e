"""Precision and recall of a mapper over a gold set of captions (tests and bench/emoji_quality.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .mapper import EmojiMapper


@dataclass(frozen=True, slots=True)
class GoldCaption:
    caption: str
    expected: dict[str, frozenset[str]]  # word -> acceptable emojis


@dataclass(slots=True)
class Scores:
    predicted: int = 0
    expected: int = 0
    correct: int = 0
    wrong: list[tuple[str, str, str]] = field(default_factory=list)  # caption, word, emoji
    missed: list[tuple[str, str]] = field(default_factory=list)  # caption, word

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.expected if self.expected else 1.0


def _strip_vs(text: str) -> str:
    return text.replace("\ufe0f", "")


def load_gold(path: Path) -> list[GoldCaption]:
    gold = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        caption, _, mappings = line.partition("::")
        expected: dict[str, frozenset[str]] = {}
        for item in mappings.split():
            word, _, emojis = item.partition("=")
            expected[word] = frozenset(_strip_vs(e) for e in emojis.split("|"))
        gold.append(GoldCaption(caption.strip(), expected))
    return gold


def evaluate(mapper: EmojiMapper, gold: list[GoldCaption]) -> Scores:
    """A mapping is correct when its word is expected and its emoji is one of the acceptable ones
    (variation selectors ignored); every other mapping counts against precision."""
    scores = Scores()
    for item in gold:
        got = mapper.map(item.caption)
        scores.predicted += len(got)
        scores.expected += len(item.expected)
        found = set()
        for m in got:
            ok = _strip_vs(m.emoji) in item.expected.get(m.word, frozenset())
            if ok:
                scores.correct += 1
                found.add(m.word)
            else:
                scores.wrong.append((item.caption, m.word, m.emoji))
        scores.missed += [(item.caption, w) for w in item.expected if w not in found]
    return scores

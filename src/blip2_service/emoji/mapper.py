"""Caption words to emojis: longest multi-word match first, then the word as written, then its lemmas.

Captions are short ("a man riding a wave on top of a surfboard"), so a
greedy left-to-right scan over a dict is both the simplest and the fastest
matcher: a handful of dict look-ups per word.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

from ..domain import EmojiMapping

_WORD_RE = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*")
_VARIATION_SELECTOR = "\ufe0f"


def _lemmas_default(word: str, upos_order: tuple[str, ...] = ("NOUN", "VERB")) -> tuple[str, ...]:
    """Noun lemma, then verb lemma (lemminflect ships its data; no download)."""
    from lemminflect import getLemma

    out: list[str] = []
    for upos in upos_order:
        for lemma in getLemma(word, upos=upos, lemmatize_oov=True):
            lemma = lemma.lower()
            if lemma != word and lemma not in out:
                out.append(lemma)
    return tuple(out)


class EmojiMapper:
    """Maps a caption to `EmojiMapping`s in caption order, each word once."""

    def __init__(
        self,
        table: Mapping[str, str],
        stopwords: Iterable[str] = (),
        *,
        lemmatizer: Callable[[str], tuple[str, ...]] = _lemmas_default,
    ) -> None:
        self._table = {self.normalise_key(k): v for k, v in table.items()}
        self._stop = frozenset(self.normalise_key(w) for w in stopwords)
        self._max_words = max((k.count("_") + 1 for k in self._table), default=1)
        # Longest first, so a flag or a family is found whole before the emojis it is made of.
        bare = sorted({v.replace(_VARIATION_SELECTOR, "") for v in self._table.values() if v}, key=len, reverse=True)
        self._glyph_re = re.compile("|".join(map(re.escape, bare))) if bare else None
        self._lemmas = lru_cache(maxsize=65536)(lemmatizer)
        self._noun_lemmas = lru_cache(maxsize=65536)(
            (lambda w: _lemmas_default(w, ("NOUN",))) if lemmatizer is _lemmas_default else lemmatizer
        )

    def __len__(self) -> int:
        return len(self._table)

    @staticmethod
    def normalise_key(key: str) -> str:
        return "_".join(_WORD_RE.findall(key.lower().replace("’", "'")))

    def tokens(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower().replace(_VARIATION_SELECTOR, "").replace("’", "'"))

    def emojis_in(self, text: str) -> tuple[tuple[str, ...], str]:
        """The emojis a search names, without variation selectors, and the text left around them.

        The table's emojis are found whole (👨‍👩‍👧 is one, not three); any other pictograph counts
        as an emoji of its own, which no caption holds, so searching for it finds nothing instead
        of everything (a search with no words left was no filter at all).
        """
        rest = text.replace(_VARIATION_SELECTOR, "")
        if rest.isascii():  # no emoji is: spare the search box's every keystroke the big pattern
            return (), rest
        found: list[str] = []
        if self._glyph_re is not None:
            found.extend(self._glyph_re.findall(rest))
            rest = self._glyph_re.sub(" ", rest)
        others = [c for c in rest if unicodedata.category(c) == "So"]
        found.extend(others)
        for c in others:
            rest = rest.replace(c, " ")
        return tuple(dict.fromkeys(found)), rest

    def lookup(self, word: str) -> str | None:
        """The emoji for one word or `_`-joined phrase, trying lemmas; None when stoplisted or unknown."""
        tokens = self.tokens(word.replace("_", " "))
        hit = self._match(tokens) if tokens else None
        return hit[0] if hit else None

    def map(self, text: str) -> list[EmojiMapping]:
        tokens = self.tokens(text)
        out: list[EmojiMapping] = []
        seen_words: set[str] = set()
        last_emoji: str | None = None
        last_end = -1  # token index just after the previous mapped span
        i = 0
        while i < len(tokens):
            matched = False
            for size in range(min(self._max_words, len(tokens) - i), 0, -1):
                span = tokens[i : i + size]
                hit = self._match(span)
                if hit is None:
                    continue
                emoji, key = hit
                # A phrase is named by its table entry ("teddy bears" -> teddy_bear); a single
                # word as the caption wrote it ("flowers"), as the old service did.
                word = key if size > 1 else span[0]
                # Each word once; and neighbouring words with one emoji ("laptop computer")
                # show it once.
                if word not in seen_words and not (emoji == last_emoji and i == last_end):
                    out.append(EmojiMapping(emoji=emoji, word=word))
                    seen_words.add(word)
                last_emoji, last_end = emoji, i + size
                i += size
                matched = True
                break
            if not matched:
                i += 1
        return out

    def _match(self, span: list[str]) -> tuple[str, str] | None:
        """(emoji, table key) for a span of tokens, or None."""
        written = "_".join(span)
        if written in self._stop:
            return None
        hit = self._table.get(written)
        if hit is not None:
            return hit, written
        # Inflections live on the last word of a phrase: "teddy bears" -> "teddy_bear".
        # Phrases are noun compounds: only a plural folds ("bus stopped" is not "bus_stop").
        head = span[:-1]
        lemmas = self._noun_lemmas(span[-1]) if head else self._lemmas(span[-1])
        for lemma in lemmas:
            key = "_".join([*head, lemma])
            if key in self._stop:
                return None
            hit = self._table.get(key)
            if hit is not None:
                return hit, key
        return None

"""Rebuild src/blip2_service/emoji/data/table.json from pinned sources.

Sources, in priority order for a word:
  1. overrides.json "prefer"   (the project's curated choices for caption words)
  2. CLDR short names          (cldr-annotations-full 48.2.0, annotations/en, Unicode-3.0 licence)
  3. `emoji` package names and aliases (emoji==2.16.0)
  4. CLDR keywords              (only keywords shared by few emojis, minus blocked ones)
Ties go to objects, animals, food and places over people, faces and symbols.
Skin-tone variants, flags and keycaps are left out. Run:

    .venv/bin/python tools/emoji/build_table.py
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import emoji as emoji_pkg

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "src" / "blip2_service" / "emoji" / "data" / "table.json"
CLDR_VERSION = "48.2.0"
MAX_KEYWORD_SHARE = 6
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


_FUNCTION_WORDS = {"a", "an", "the", "with", "of", "on", "in", "at", "and", "or", "for", "to", "from", "by", "no"}
_PEOPLE = {"man", "woman", "person", "men", "women", "people", "family", "couple", "kiss"}


def _lemmas(word: str) -> list[str]:
    from lemminflect import getLemma

    out: list[str] = []
    for upos in ("NOUN", "VERB"):
        out += [lemma for lemma in getLemma(word, upos=upos) if lemma != word and lemma not in out]
    return out


def _undepicted(key: str, score: tuple[int, ...], name: str) -> bool:
    """A verb or adjective known only from an emoji's keywords, and not in its name, is dropped:
    the emoji depicts something else ("swinging" is a keyword of cricket 🏏, "high" of ✋)."""
    if score[0] < 3 or "_" in key:
        return False
    from lemminflect import getAllLemmas

    forms = getAllLemmas(key)
    if not set(forms) & {"ADJ", "VERB"} or "NOUN" in forms:
        return False  # nouns stay as they are
    stems = {key, *(lemma for lemmas in forms.values() for lemma in lemmas)}
    named = set(name.split())
    for word in list(named):
        named.update(lemma for lemmas in getAllLemmas(word).values() for lemma in lemmas)
    return not stems & named


def key_of(text: str) -> str:
    return "_".join(_WORD.findall(text.lower().replace("’", "'")))


def skip(e: str) -> bool:
    cps = [ord(c) for c in e]
    if any(0x1F3FB <= c <= 0x1F3FF for c in cps):  # skin tones
        return True
    if any(0x1F1E6 <= c <= 0x1F1FF for c in cps) or any(0xE0020 <= c <= 0xE007F for c in cps):  # flags
        return True
    if 0x20E3 in cps:  # keycaps
        return True
    return len(e) == 1 and cps[0] < 0x2000  # letters, digits, punctuation


def qualified(e: str) -> str | None:
    data = emoji_pkg.EMOJI_DATA
    for form in (e, e + "\ufe0f"):
        info = data.get(form)
        if info is not None and info.get("status") == emoji_pkg.STATUS["fully_qualified"]:
            return form
    return None


def penalty(e: str, name: str) -> int:
    """0: objects, animals, food, places; 1: people and body; 2: faces and symbols."""
    cp = ord(e[0])
    words = set(name.split())
    if "\u200d" in e and (name.startswith(("man ", "woman ")) or "\u2642" in e or "\u2640" in e):
        return 3  # gendered variants: the neutral form says the same

    if words & {"button", "sign", "symbol", "mark", "arrow", "square", "circle", "keycap", "heart"}:
        return 2
    if 0x1F600 <= cp <= 0x1F64F or 0x1F910 <= cp <= 0x1F92F or 0x1F970 <= cp <= 0x1F97A or 0x1FAE0 <= cp <= 0x1FAEF:
        return 2
    if "face" in words and not (0x1F400 <= cp <= 0x1F43F):
        return 2
    if 0x1F466 <= cp <= 0x1F487 or 0x1F9D1 <= cp <= 0x1F9DF or 0x1F645 <= cp <= 0x1F64F or "person" in words:
        return 1
    return 0


def main(out: Path = OUT) -> int:
    cldr = json.loads((HERE / "cldr-annotations-en.json").read_text())["annotations"]["annotations"]
    overrides = json.loads((HERE / "overrides.json").read_text())
    stop = {key_of(w) for w in overrides["stopwords"]}
    blocked = {key_of(w) for w in overrides["blocked_keywords"]}

    share = Counter(key_of(k) for v in cldr.values() for k in v.get("default", []))
    best: dict[str, tuple[tuple[int, int, int, int], str]] = {}
    names: dict[str, str] = {}

    def offer(key: str, e: str, rank: int, name: str) -> None:
        if not key or key in stop or key.isdigit() or len(key) < 2:
            return
        words = key.split("_")
        # Phrases that would swallow caption words: "man cook", "woman walking", "person
        # surfing", "beach with umbrella". Captions say "a man cooking": two mappings.
        if len(words) > 1 and (
            words[0] in _PEOPLE or any(w in _FUNCTION_WORDS for w in words) or all(w in stop for w in words)
        ):
            return
        score = (rank, penalty(e, name), len(name), ord(e[0]))
        if key not in best or score < best[key][0]:
            best[key] = (score, e)

    for raw, info in cldr.items():
        if skip(raw):
            continue
        e = qualified(raw)
        if e is None:
            continue
        name = (info.get("tts") or [""])[0].lower()
        if e is not None:
            names[e] = name
        if ":" not in name:
            offer(key_of(name), e, 1, name)
        pkg = emoji_pkg.EMOJI_DATA[e]
        if "button" in name.split():
            continue  # 🆓 🆒 🆙: enclosed words, never what a caption means
        for alias in [pkg["en"], *pkg.get("alias", [])]:
            alias_key = key_of(alias.strip(":").replace("_", " "))
            if not any(ch.isdigit() for ch in alias_key):
                offer(alias_key, e, 2, name)
        for keyword in info.get("default", []):
            kw = key_of(keyword)
            if kw in blocked or share[kw] > MAX_KEYWORD_SHARE:
                continue
            offer(kw, e, 3, name)

    table = {key: e for key, (_score, e) in best.items() if not _undepicted(key, _score, names.get(e, ""))}
    # A keyword-only entry for an inflected form loses to its lemma's better entry:
    # "mountains" is a keyword of 🌄, but "mountain" is named ⛰️.
    preferred = {key_of(w) for w in overrides["prefer"]}
    for key, (score, _e) in best.items():
        if score[0] < 3 or "_" in key:
            continue
        for lemma in _lemmas(key):
            lemma_score = best.get(lemma, ((9,), ""))[0]
            if lemma in preferred or lemma_score[0] < 3:
                table[key] = overrides["prefer"].get(lemma) or best[lemma][1]
                break
    for word, e in overrides["prefer"].items():
        table[key_of(word)] = unicodedata.normalize("NFC", e)
    for word in stop:
        table.pop(word, None)
    payload = {
        "sources": {
            "cldr-annotations-full": CLDR_VERSION,
            "emoji": emoji_pkg.__version__,
            "overrides": "tools/emoji/overrides.json",
        },
        "table": dict(sorted(table.items())),
        "stopwords": sorted(stop),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, ensure_ascii=False, indent=0, sort_keys=False) + "\n")
    print(f"wrote {out} with {len(table)} words and {len(stop)} stopwords")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))

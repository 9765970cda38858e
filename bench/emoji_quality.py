"""Emoji mapping quality and speed: precision/recall on the gold sets, ms per caption, table load time.

Usage: .venv/bin/python bench/emoji_quality.py [--show-errors]   (finishes in a few seconds)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from blip2_service.emoji import EmojiMapper, load_bundled
from blip2_service.emoji.quality import evaluate, load_gold

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show-errors", action="store_true", help="list wrong and missed mappings")
    args = parser.parse_args()

    loads = []
    for _ in range(5):
        started = time.perf_counter()
        table = load_bundled()
        mapper = EmojiMapper(table.table, table.stopwords)
        loads.append(time.perf_counter() - started)
    print(f"table: {len(mapper)} words; load (json + index) median {1000 * statistics.median(loads):.1f} ms")

    for name in ("emoji_gold.txt", "emoji_holdout.txt"):
        gold = load_gold(DATA / name)
        scores = evaluate(mapper, gold)
        print(
            f"{name:18s} {len(gold):4d} captions  precision {scores.precision:.3f}  recall {scores.recall:.3f}"
            f"  ({scores.correct} right of {scores.predicted} mapped, {scores.expected} expected)"
        )
        if args.show_errors:
            for caption, word, emoji in scores.wrong:
                print(f"    wrong  {word}={emoji}  in '{caption}'")
            for caption, word in scores.missed:
                print(f"    missed {word}  in '{caption}'")

    captions = [g.caption for g in load_gold(DATA / "emoji_gold.txt")]
    for c in captions:  # warm the lemma cache as a running service would be
        mapper.map(c)
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        for c in captions:
            mapper.map(c)
        timings.append((time.perf_counter() - started) / len(captions))
    cold = EmojiMapper(table.table, table.stopwords)
    started = time.perf_counter()
    for c in captions:
        cold.map(c)
    cold_ms = 1000 * (time.perf_counter() - started) / len(captions)
    print(
        f"map one caption: median {1000 * statistics.median(timings):.3f} ms warm, {cold_ms:.3f} ms cold "
        f"(first sight of each word, lemmatised)"
    )


if __name__ == "__main__":
    main()

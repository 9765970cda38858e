"""Emoji mapping: quality on gold captions, matching rules, the table build, refresh and fallback."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blip2_service.emoji import EmojiMapper, load_bundled, load_table
from blip2_service.emoji.quality import evaluate, load_gold
from blip2_service.emoji.table import validate_remote

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]


def pairs(mapper: EmojiMapper, text: str) -> list[tuple[str, str]]:
    return [(m.word, m.emoji) for m in mapper.map(text)]


@pytest.mark.parametrize("name", ["emoji_gold.txt", "emoji_holdout.txt"])
def test_precision_and_recall_over_coco_style_captions(mapper: EmojiMapper, name: str) -> None:
    gold = load_gold(DATA / name)
    scores = evaluate(mapper, gold)
    print(f"{name}: {len(gold)} captions, precision {scores.precision:.3f}, recall {scores.recall:.3f}")
    assert len(gold) >= (150 if name == "emoji_gold.txt" else 50)
    assert scores.precision >= 0.90, scores.wrong
    assert scores.recall >= 0.80, scores.missed


def test_verbs_and_adjectives_map_only_to_emojis_that_depict_them(mapper: EmojiMapper) -> None:
    gold = load_gold(DATA / "emoji_verbs.txt")
    scores = evaluate(mapper, gold)
    print(f"emoji_verbs.txt: {len(gold)} captions, precision {scores.precision:.3f}, recall {scores.recall:.3f}")
    assert len(gold) >= 40
    assert scores.precision >= 0.95, scores.wrong
    assert scores.recall >= 0.90, scores.missed
    for caption, slip in [
        ("a baseball player swinging a bat", "swinging"),
        ("a man catching a frisbee", "catching"),
        ("a kite flying high in the sky", "high"),
        ("a kite flying high in the sky", "flying"),
    ]:
        assert slip not in dict(pairs(mapper, caption)), caption
    assert dict(pairs(mapper, "trees with autumn leaves"))["autumn"] == "🍂"


def test_the_contract_example(mapper: EmojiMapper) -> None:
    got = pairs(mapper, "a man in a military uniform handing flowers to a little girl")
    assert [w for w, _ in got] == ["man", "military_uniform", "handing", "flowers", "girl"]
    assert dict(got)["flowers"] == "🌼"


def test_multi_word_expressions_match_longest_first(mapper: EmojiMapper) -> None:
    assert pairs(mapper, "a hot dog on a plate")[0] == ("hot_dog", "🌭")
    assert pairs(mapper, "a stop sign") == [("stop_sign", "🛑")]
    assert pairs(mapper, "two teddy bears")[0] == ("teddy_bear", "🧸")  # plural folds onto the phrase
    assert pairs(mapper, "a fire hydrant")[0][0] == "fire_hydrant"
    # a verb is not a noun compound's plural
    assert [w for w, _ in pairs(mapper, "a bus stopped at a bus stop")] == ["bus", "bus_stop"]


def test_lemmas_written_form_first(mapper: EmojiMapper) -> None:
    assert pairs(mapper, "flowers") == [("flowers", "🌼")]
    assert pairs(mapper, "glasses") == [("glasses", "👓")]  # not "glass"
    assert pairs(mapper, "candles")[0][1] == "🕯️"
    assert pairs(mapper, "giraffes")[0] == ("giraffes", "🦒")
    assert pairs(mapper, "mountains")[0][1] == "⛰️"  # the lemma's name beats a keyword of the plural


def test_function_words_positions_colours_and_fillers_never_map(mapper: EmojiMapper) -> None:
    text = (
        "a the of on in at top bottom front back side next middle near is are sitting standing holding "
        "looking red white black large small two up down new free cool ok"
    )
    assert pairs(mapper, text) == []


def test_each_word_once_and_no_repeat_for_neighbours(mapper: EmojiMapper) -> None:
    words = [w for w, _ in pairs(mapper, "a dog and a dog and a cat")]
    assert words == ["dog", "cat"]
    got = pairs(mapper, "a laptop computer")
    assert got == [("laptop", "💻")]  # neighbours with one emoji: shown once
    assert [w for w, _ in pairs(mapper, "a cup of coffee")] == ["cup", "coffee"]  # not neighbours


def test_normalisation(mapper: EmojiMapper) -> None:
    assert pairs(mapper, "A DOG, running!") == pairs(mapper, "a dog running")
    assert pairs(mapper, "a dog\ufe0f") == pairs(mapper, "a dog")


def test_priority_curated_then_name_then_keyword(mapper: EmojiMapper) -> None:
    table = load_bundled().table
    assert table["dog"] == "🐕"  # CLDR name "dog" beats 🐶 ("dog face") and keyword hits
    assert table["mouse"] == "🖱️"  # curated: COCO's mouse is the computer's
    assert table["bat"] == "⚾"  # curated: captions swing bats
    assert table["puppy"] == "🐶"  # curated over the keyword
    # no skin tones or flags anywhere
    assert not any(0x1F3FB <= ord(ch) <= 0x1F3FF for e in table.values() for ch in e)
    assert not any(0x1F1E6 <= ord(ch) <= 0x1F1FF for e in table.values() for ch in e)


def test_the_coco_categories_are_covered(mapper: EmojiMapper) -> None:
    categories = [
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "airplane",
        "bus",
        "train",
        "truck",
        "boat",
        "traffic_light",
        "fire_hydrant",
        "stop_sign",
        "parking_meter",
        "bench",
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "backpack",
        "umbrella",
        "handbag",
        "tie",
        "suitcase",
        "frisbee",
        "skis",
        "snowboard",
        "sports_ball",
        "kite",
        "baseball_bat",
        "baseball_glove",
        "skateboard",
        "surfboard",
        "tennis_racket",
        "bottle",
        "wine_glass",
        "cup",
        "fork",
        "knife",
        "spoon",
        "bowl",
        "banana",
        "apple",
        "sandwich",
        "orange",
        "broccoli",
        "carrot",
        "hot_dog",
        "pizza",
        "donut",
        "cake",
        "chair",
        "couch",
        "potted_plant",
        "bed",
        "dining_table",
        "toilet",
        "tv",
        "laptop",
        "mouse",
        "remote",
        "keyboard",
        "cell_phone",
        "microwave",
        "oven",
        "toaster",
        "sink",
        "refrigerator",
        "book",
        "clock",
        "vase",
        "scissors",
        "teddy_bear",
        "hair_drier",
        "toothbrush",
    ]
    assert len(categories) == 80
    missing = [c for c in categories if mapper.lookup(c) is None]
    assert missing == []


def test_the_committed_table_is_what_the_build_script_makes(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    subprocess.run(
        [sys.executable, str(ROOT / "tools/emoji/build_table.py"), str(out)], check=True, capture_output=True
    )
    committed = json.loads((ROOT / "src/blip2_service/emoji/data/table.json").read_text())
    assert json.loads(out.read_text()) == committed


def test_the_table_loads_quickly_enough_to_not_matter() -> None:
    started = time.perf_counter()
    table = load_bundled()
    EmojiMapper(table.table, table.stopwords)
    print(f"table load {1000 * (time.perf_counter() - started):.1f} ms")  # the bench reports it; no assert


# -- refresh ----------------------------------------------------------------------------------


class _TableServer:
    """A real local HTTP server playing EMOJI_MAPPINGS_URL."""

    def __init__(self) -> None:
        self.body: bytes = json.dumps({"zorblat": "🦄", "dog": "🐩"}).encode()
        self.etag = '"v1"'
        self.delay = 0.0
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers))
                time.sleep(outer.delay)
                if self.headers.get("If-None-Match") == outer.etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("ETag", outer.etag)
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/emoji.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def table_server() -> Iterator[_TableServer]:
    server = _TableServer()
    yield server
    server.close()


def test_refresh_merges_the_remote_table_and_caches_it(table_server: _TableServer, tmp_path: Path) -> None:
    table = load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=5)
    assert table.origin == "bundled+remote"
    assert table.table["zorblat"] == "🦄"
    assert table.table["dog"] == "🐩"  # the user's table wins over the bundle
    assert table.table["cat"] == load_bundled().table["cat"]
    assert json.loads((tmp_path / "emoji-remote.json").read_text()) == {"zorblat": "🦄", "dog": "🐩"}
    # second start: conditional GET, 304, the cache is used
    again = load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=5)
    assert table_server.requests[-1].get("If-None-Match") == '"v1"'
    assert again.origin == "bundled+cache (not modified)" and again.table["zorblat"] == "🦄"


def test_bad_json_keeps_the_last_good_cache(
    table_server: _TableServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=5)
    table_server.body, table_server.etag = b"{not json", '"v2"'
    table = load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=5)
    assert table.origin == "bundled+cache" and table.table["zorblat"] == "🦄"
    assert sum("emoji table refresh" in r.message for r in caplog.records) == 1


def test_a_timeout_without_cache_falls_back_to_the_bundle(table_server: _TableServer, tmp_path: Path) -> None:
    table_server.delay = 2.0
    table = load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=0.5)
    assert table.origin == "bundled"
    assert "zorblat" not in table.table


def test_offline_uses_the_cache_without_fetching(table_server: _TableServer, tmp_path: Path) -> None:
    load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=5)
    table_server.close()
    offline = load_table(url=table_server.url, auto_update=False, cache_dir=tmp_path, timeout=5)
    assert offline.table["zorblat"] == "🦄"
    unreachable = load_table(url=table_server.url, auto_update=True, cache_dir=tmp_path, timeout=1)
    assert unreachable.table["zorblat"] == "🦄"


@pytest.mark.parametrize(
    "bad",
    [[], {"dog": 3}, {"dog": "dog"}, {"": "🐕"}, {"dog": "🐕" * 20}],
)
def test_remote_tables_are_validated(bad: Any) -> None:
    with pytest.raises(ValueError):
        validate_remote(bad)


def test_cli_emoji_prints_the_mappings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blip2_service.cli", "emoji", "a dog running on the beach"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        env={"PATH": "/usr/bin:/bin", "AUTO_UPDATE": "false", "HOME": str(tmp_path)},
    )
    assert result.stdout.splitlines() == ["🐕\tdog", "🏃\trunning", "🏖️\tbeach"]
    as_json = subprocess.run(
        [sys.executable, "-m", "blip2_service.cli", "emoji", "--json", "teddy", "bears"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        env={"PATH": "/usr/bin:/bin", "AUTO_UPDATE": "false", "HOME": str(tmp_path)},
    )
    assert json.loads(as_json.stdout) == [{"emoji": "🧸", "word": "teddy_bear"}]


def test_a_search_names_the_tables_emojis_whole_and_any_other_pictograph() -> None:
    mapper = EmojiMapper({"couch": "🛋️", "family": "👨‍👩‍👧", "man": "👨"})
    # the family is one emoji, not the man and two others; variation selectors are dropped
    assert mapper.emojis_in("👨‍👩‍👧 on a 🛋️")[0] == ("👨‍👩‍👧", "🛋")
    assert mapper.emojis_in("🛋 🛋️ 👨")[0] == ("🛋", "👨")
    # a pictograph the table lacks is still an emoji (found in no caption), not nothing
    emojis, words = mapper.emojis_in("♜ dog's bed")
    assert emojis == ("♜",) and words.split() == ["dog's", "bed"]

"""The word→emoji table: the bundled build, optionally with a refreshed remote table merged over it.

The remote table keeps the old service's format (a flat `{"word": "emoji"}`
JSON object), so tables users already maintain keep working. Any failure
falls back to the last good cached copy, then to the bundle: the service
never starts without emojis because a URL was down.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REMOTE_BYTES = 8 * 1024 * 1024
MAX_REMOTE_ENTRIES = 200_000


@dataclass(frozen=True, slots=True)
class EmojiTable:
    table: dict[str, str]
    stopwords: list[str]
    origin: str


def load_bundled() -> EmojiTable:
    raw = resources.files("blip2_service.emoji").joinpath("data/table.json").read_text("utf-8")
    data = json.loads(raw)
    return EmojiTable(dict(data["table"]), list(data["stopwords"]), "bundled")


def validate_remote(data: Any) -> dict[str, str]:
    """A flat object of word → emoji; raises ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of word to emoji, got {type(data).__name__}")
    if len(data) > MAX_REMOTE_ENTRIES:
        raise ValueError(f"{len(data)} entries is over the limit of {MAX_REMOTE_ENTRIES}")
    out: dict[str, str] = {}
    for word, emoji in data.items():
        if not isinstance(word, str) or not isinstance(emoji, str) or not word.strip() or not emoji.strip():
            raise ValueError(f"entry {word!r}: {emoji!r} is not a word mapped to an emoji string")
        if len(emoji) > 16 or emoji.isascii():
            raise ValueError(f"entry {word!r}: {emoji!r} does not look like an emoji")
        out[word] = emoji
    return out


class RemoteTable:
    """Fetches EMOJI_MAPPINGS_URL with conditional GETs and keeps an atomic local cache."""

    def __init__(self, url: str, cache_dir: Path, timeout: float = 10.0) -> None:
        self.url = url
        self.cache_file = cache_dir / "emoji-remote.json"
        self.meta_file = cache_dir / "emoji-remote.meta.json"
        self.timeout = timeout

    def load(self) -> tuple[dict[str, str] | None, str]:
        """The remote table (fresh or cached) and where it came from; None when neither works."""
        try:
            fresh = self._fetch()
        except Exception as exc:
            cached = self._read_cache()
            where = "the cached copy" if cached is not None else "the bundled table"
            log.warning("emoji table refresh from %s failed (%s); using %s", self.url, exc, where)
            return cached, "cache" if cached is not None else "bundled"
        if fresh is None:  # 304 Not Modified
            cached = self._read_cache()
            return cached, "cache (not modified)" if cached is not None else "bundled"
        return fresh, "remote"

    def _fetch(self) -> dict[str, str] | None:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        meta = self._read_meta()
        if self.cache_file.exists():
            if meta.get("etag"):
                request.add_header("If-None-Match", meta["etag"])
            if meta.get("last_modified"):
                request.add_header("If-Modified-Since", meta["last_modified"])
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                body = resp.read(MAX_REMOTE_BYTES + 1)
                headers = resp.headers
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return None
            raise
        if len(body) > MAX_REMOTE_BYTES:
            raise ValueError(f"the table is over {MAX_REMOTE_BYTES} bytes")
        table = validate_remote(json.loads(body.decode("utf-8")))
        self._write_atomic(self.cache_file, json.dumps(table, ensure_ascii=False))
        self._write_atomic(
            self.meta_file,
            json.dumps({"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"), "url": self.url}),
        )
        return table

    def _read_cache(self) -> dict[str, str] | None:
        try:
            return validate_remote(json.loads(self.cache_file.read_text("utf-8")))
        except (OSError, ValueError):
            return None

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_file.read_text("utf-8"))
            return meta if isinstance(meta, dict) and meta.get("url") == self.url else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_table(*, url: str = "", auto_update: bool = True, cache_dir: Path, timeout: float = 10.0) -> EmojiTable:
    bundled = load_bundled()
    if not url:
        return bundled
    remote = RemoteTable(url, cache_dir, timeout)
    if auto_update:
        extra, origin = remote.load()
    else:
        extra, origin = remote._read_cache(), "cache"
    if not extra:
        return bundled
    merged = {**bundled.table, **extra}
    return EmojiTable(merged, bundled.stopwords, f"bundled+{origin}")

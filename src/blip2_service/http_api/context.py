"""What the HTTP handlers need, built by runtime.py and stored on the app (no module globals)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..captioner.holder import ModelHolder
from ..config import Settings
from ..emoji.mapper import EmojiMapper
from ..fetching import UrlFetcher
from ..gateway import QueueGateway
from ..metrics import Metrics
from ..pipeline import CaptionPipeline
from ..store.repository import CaptionRepository


@dataclass
class HttpContext:
    settings: Settings
    pipeline: CaptionPipeline
    holder: ModelHolder
    store: CaptionRepository | None
    fetcher: UrlFetcher
    metrics: Metrics
    mapper: EmojiMapper
    file_roots: list[Path]
    health_extras: Callable[[], dict[str, Any]] = field(default=lambda: {})
    device_hint: str = "cpu"  # the device DEVICE resolves to, shown before the model is loaded
    gateway: QueueGateway | None = None  # INFERENCE=queue: captions come from workers through the queue
    broker_problem: Callable[[], str | None] = field(default=lambda: None)  # why the broker is down, if it is
    model_used: bool = True  # False in a publishing watcher: its images are captioned by the workers
    # `consume` / `watch` (HEALTH_PORT): the adapters are the process's work, so one that is not
    # doing it (a watched folder gone, publishing failing) makes /health 503; `serve` goes on serving.
    adapter_problems: Callable[[], list[str]] = field(default=lambda: [])


CONTEXT = web.AppKey("blip2_context", HttpContext)

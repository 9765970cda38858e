"""Loads the model in the background so the service answers /health while weights load (or fail).

Two phases: `loading` (weights) and `warming` (the compiled decode step recorded for every batch
bucket, COMPILE); the captioner is handed out only after both, so no request pays for either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from .generate import Captioner
from .loading import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

Status = Literal["loading", "warming", "loaded", "failed"]


class ModelHolder:
    def __init__(
        self, loader: Callable[[], LoadedModel], prepare: Callable[[LoadedModel], Captioner] = Captioner
    ) -> None:
        """`prepare` turns the loaded weights into a ready captioner (building and warming its decoder)."""
        self._loader = loader
        self._prepare = prepare
        self.warm_seconds: float | None = None
        self._ready = threading.Event()
        self.status: Status = "loading"
        self.error: str | None = None
        self.captioner: Captioner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """The background load is still reading weights or compiling (nothing can interrupt it)."""
        return self._thread is not None and self._thread.is_alive()

    def load_now(self) -> Captioner:
        """Load on the calling thread (CLI commands that need the model before anything else)."""
        self._load()
        if self.captioner is None:
            raise ModelLoadError(self.error or "model failed to load")
        return self.captioner

    def wait(self, timeout: float | None = None) -> bool:
        """True once loaded; False when loading failed or the timeout passed."""
        self._ready.wait(timeout)
        return self.status == "loaded"

    def wait_unless(self, stop: threading.Event) -> bool:
        """`wait()` that ends as soon as `stop` is set: True once loaded; False when loading failed
        or the process is stopping (a load or warm-up takes minutes and cannot be interrupted)."""
        while not self.wait(0.2):
            if self.status == "failed" or stop.is_set():
                return False
        return True

    def _load(self) -> None:
        try:
            loaded = self._loader()
            self.status = "warming"
            started = time.perf_counter()
            captioner = self._prepare(loaded)
            self.warm_seconds = time.perf_counter() - started
            self.captioner = captioner
            self.status = "loaded"
        except ModelLoadError as exc:
            self.error = str(exc)
            self.status = "failed"
            log.error("model failed to load: %s", exc)
        except Exception as exc:  # a bug or a broken checkpoint: still report it on /health
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log.exception("model failed to load")
        finally:
            self._ready.set()

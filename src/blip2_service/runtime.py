"""Wiring: build every object from Settings, start what is configured, stop it all in order.

This is the only place that knows which adapters exist; adapters and the core
receive what they need as arguments (no module globals).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from .captioner.generate import Captioner
from .captioner.holder import ModelHolder
from .captioner.loading import LoadedModel, ModelLoadError, device_hint, load_model, resolve_model_id
from .captioner.static_decode import make_decoder
from .config import ConfigError, Settings
from .emoji import build_mapper
from .fetching import UrlFetcher
from .http_api.app import make_app, make_probe_app
from .http_api.capped_site import CappedSite, connection_ceiling, raise_open_file_limit
from .http_api.context import HttpContext
from .imaging import heif_support
from .metrics import Metrics
from .pipeline import CaptionPipeline, PipelineLimits, auto_prepare_workers
from .store import CaptionRepository, make_engine
from .store.migrate import upgrade_when_reachable

log = logging.getLogger(__name__)


def prepare_captioner(loaded: LoadedModel, *, settings: Settings) -> Captioner:
    """The captioner for these settings: with the static decoder (COMPILE) warmed for every bucket."""
    decoder = make_decoder(
        loaded,
        mode=settings.compile,
        buckets=settings.compile_buckets,
        batch_max_size=settings.batch_max_size,
        max_new_tokens=settings.max_new_tokens,
    )
    captioner = Captioner(loaded, decoder=decoder)
    if decoder is not None:
        log.info("warming the compiled decode step for batch buckets %s", ",".join(map(str, decoder.buckets)))
        started = time.perf_counter()
        captioner.warm_up(settings.generation())
        log.info("decode warmed: %d buckets in %.1fs", len(decoder.buckets), time.perf_counter() - started)
    return captioner


class Runtime:
    def __init__(self, settings: Settings, *, holder: ModelHolder | None = None) -> None:
        """`holder` lets tests share one loaded model across runtimes; normally built here."""
        self.settings = settings
        self.metrics = Metrics()
        self.engine = make_engine(settings.database_url, schema=settings.db_schema)
        self.store = CaptionRepository(self.engine)
        self.mapper = build_mapper(settings)
        self.holder = holder or ModelHolder(
            partial(
                load_model,
                resolve_model_id(settings.model),
                device=settings.device,
                dtype=settings.dtype,
                model_dir=settings.model_dir,
                data_dir=settings.data_dir,
                allow_download=settings.model_download,
            ),
            partial(prepare_captioner, settings=settings),
        )
        self.pipeline = CaptionPipeline(
            holder=self.holder,
            mapper=self.mapper,
            store=self.store,
            limits=PipelineLimits(
                max_file_size=settings.max_file_size,
                max_image_pixels=settings.max_image_pixels,
                batch_max_size=settings.batch_max_size,
                batch_max_wait_s=settings.batch_max_wait_ms / 1000.0,
                max_pending=settings.max_pending,
                prepare_workers=settings.prepare_workers
                or auto_prepare_workers(
                    on_gpu=settings.inference == "local" and device_hint(settings.device).startswith("cuda")
                ),
            ),
            metrics=self.metrics,
        )
        self.adapters: list[Any] = []
        self.serving_api = False  # `serve` listening; `consume` / `watch` answer only /health (HEALTH_PORT)
        self.expected_adapters: set[str] = set()  # `consume` / `watch`: what the process is for
        self.gateway: Any = None  # QueueGateway in INFERENCE=queue
        self._closables: list[Callable[[], None]] = []
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, background_model: bool = True, load_model: bool = True) -> None:
        """Migrate the store, start the inference thread and load the model (unless not needed)."""
        if self._started:
            return
        self._started = True
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        upgrade_when_reachable(self.engine, self.settings.startup_timeout)
        if self.settings.watch_dirs:
            missing = [str(d) for d in self.settings.watch_dirs if not Path(d).expanduser().is_dir()]
            if missing:  # a typo would otherwise watch an empty folder of its own making, silently
                raise ConfigError(f"WATCH_DIRS names folders that do not exist: {', '.join(missing)}")
        self.pipeline.start()
        if self.settings.inference == "queue":
            # Gateway mode: no model here; requests go to the workers through the queue.
            from .amqp_topology import Topology
            from .gateway import QueueGateway

            self.gateway = QueueGateway(
                self.settings.broker_url,
                Topology(self.settings.queue_name, self.settings.results_exchange),
                timeout=self.settings.gateway_timeout,
                max_pending=self.settings.max_pending,
                metrics=self.metrics,
            )
            self.metrics.pending.set_function(lambda: self.gateway.pending)  # the pipeline has none here
            self.gateway.start()
            self._closables.append(self.gateway.stop)
            return
        if not heif_support():  # said once at start, where images are decoded, not per photo
            log.info("HEIC/HEIF photos will be refused: pillow-heif is not installed (pip install pillow-heif)")
        if self.holder.status == "loaded" or not load_model:
            pass
        elif background_model:
            self.holder.start()
        else:
            self.holder.load_now()

    def stop(self, timeout: float = 60.0) -> None:
        for adapter in reversed(self.adapters):
            try:
                adapter.stop()
            except Exception:
                log.exception("stopping %s failed", type(adapter).__name__)
        self.adapters.clear()
        self.pipeline.stop(timeout)
        for close in self._closables:
            close()
        self.engine.dispose()

    def health_extras(self) -> dict[str, Any]:
        sources: dict[str, Any] = {"http": {"state": "running"}} if self.serving_api else {}
        if self.gateway is not None:
            sources["gateway"] = self.gateway.health()
        for adapter in self.adapters:
            sources[adapter.name] = adapter.health()
        return {"sources": sources, "store_engine": self.engine.dialect.name, "emoji_words": len(self.mapper)}

    def http_context(self) -> HttpContext:
        s = self.settings
        return HttpContext(
            settings=s,
            pipeline=self.pipeline,
            holder=self.holder,
            store=self.store,
            fetcher=UrlFetcher.from_settings(s),
            metrics=self.metrics,
            mapper=self.mapper,
            file_roots=s.allowed_file_roots,
            health_extras=self.health_extras,
            device_hint=device_hint(s.device),
            gateway=self.gateway,
            broker_problem=self.broker_problem,
        )

    def adapter_problems(self) -> list[str]:
        """The adapters not doing their work: not started yet (after the model loads they wait for
        the broker), a watched folder gone, publishing failing. A started consumer's connection
        is `broker_problem`'s."""
        started = {a.name for a in self.adapters}
        return sorted(self.expected_adapters - started) + [
            a.name
            for a in self.adapters
            if a.name not in ("queue", "gateway") and a.health().get("state") not in ("running", "connected")
        ]

    def broker_problem(self) -> str | None:
        """Why the broker is unusable now, where one is configured and in use; else None."""
        for part in [self.gateway, *self.adapters]:
            if part is not None and getattr(part, "name", "") in ("queue", "gateway"):
                state = part.health()
                if state["state"] != "connected":
                    return f"{part.name} {state['state']}: {state.get('last_error') or 'no connection yet'}"
        return None

    def make_app(self) -> web.Application:
        return make_app(self.http_context())

    def app_runner(self) -> web.AppRunner:
        """The HTTP server with its edge deadlines (REQUEST_TIMEOUT).

        aiohttp's keepalive_timeout closes a connection that has not completed a request that long
        after it opened or after its last response: an idle keep-alive connection, or a client still
        trickling its headers (slowloris). Bodies have their own deadline in intake.read_stream.
        """
        timeout = self.settings.request_timeout
        # lingering_time: how long the rest of a refused body is drained before the socket closes.
        # max_line_size: a ?file= path may be MAX_PATH_CHARS characters, percent-encoded to far more.
        return web.AppRunner(
            self.make_app(),
            access_log=None,
            keepalive_timeout=timeout,
            lingering_time=min(2.0, timeout),
            max_line_size=65536,
        )

    def http_site(self, runner: web.AppRunner, port: int | None = None) -> CappedSite:
        """Where `runner` listens: HOST and PORT (or `port`), at most MAX_CONNECTIONS open at once
        (by default half the open-file limit, raised to its hard limit first)."""
        limit = connection_ceiling(self.settings.max_connections, raise_open_file_limit())
        return CappedSite(
            runner,
            self.settings.host,
            self.settings.port if port is None else port,
            limit=limit,
            on_refused=self.metrics.http_refused.inc,
        )

    # -- adapters -------------------------------------------------------------------------

    def start_adapters(self, *, watch: bool, consume: bool, stop: threading.Event | None = None) -> None:
        """Start the watcher and/or consumer (once the model is ready: they feed it without pause).
        `stop`: set when the process is stopping; the consumer's wait for its broker ends then."""
        s = self.settings
        if watch and s.watch_dirs:
            from .watcher import FolderWatcher

            publish = None
            if s.watch_mode == "publish":
                if not s.broker_url:
                    raise ConfigError("WATCH_MODE='publish' needs BROKER_URL (the queue to publish to)")
                from .amqp_topology import Topology
                from .publisher import QueuePublisher
                from .retry import ONCE

                # One try a file: the watcher retries the file itself, on the one backoff.
                publisher = QueuePublisher(s.broker_url, Topology(s.queue_name, s.results_exchange), backoff=ONCE)
                self._closables.append(publisher.close)
                publish = publisher.publish
            watcher = FolderWatcher.from_settings(s, self.pipeline, self.store, self.metrics, publish)
            self.adapters.append(watcher)
            watcher.start()
        if consume and s.broker_url:
            from .amqp_topology import wait_for_broker
            from .consumer import QueueConsumer

            if not wait_for_broker(s.broker_url, s.startup_timeout, stop=stop):
                return

            consumer = QueueConsumer.from_settings(s, self.pipeline, self.metrics)
            self.adapters.append(consumer)
            consumer.start()

    def _start_adapters_when_ready(self, *, watch: bool, consume: bool, stop: threading.Event) -> None:
        if self.gateway is not None:
            # The gateway consumes no requests; a watcher here may only publish (no model).
            if watch and self.settings.watch_mode != "publish" and self.settings.watch_dirs:
                raise ConfigError("INFERENCE=queue has no model to caption watched files: set WATCH_MODE=publish")
            self.start_adapters(watch=watch, consume=False, stop=stop)
            return

        def run() -> None:
            if self.holder.wait_unless(stop):
                self.start_adapters(watch=watch, consume=consume, stop=stop)
            elif self.holder.status == "failed":
                log.error("not starting watcher/consumer: the model did not load")

        threading.Thread(target=run, name="adapter-starter", daemon=True).start()

    def run_headless(self, *, watch: bool, consume: bool) -> int:
        """`watch` / `consume` commands: adapters without the API (only /health and /metrics with
        HEALTH_PORT), until SIGINT/SIGTERM, then drain."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _s, _f: stop.set())
        # A publishing watcher only feeds the queue: it needs no model.
        needs_model = consume or self.settings.watch_mode == "caption"
        self.expected_adapters = {name for name, wanted in (("watch", watch), ("queue", consume)) if wanted}
        # Up before the model loads: a probe sees "loading", then "warming", then "loaded".
        stop_probe = self._start_probe(model_used=needs_model)
        try:
            return self._run_headless(stop, watch=watch, consume=consume, needs_model=needs_model)
        finally:
            if stop_probe is not None:
                stop_probe()

    def _start_probe(self, *, model_used: bool) -> Callable[[], None] | None:
        """Serve /health and /metrics on HEALTH_PORT from a thread of its own; returns how to stop."""
        port = self.settings.health_port
        if not port:
            return None
        context = self.http_context()
        context.model_used = model_used
        context.adapter_problems = self.adapter_problems
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(make_probe_app(context), access_log=None)
        loop.run_until_complete(runner.setup())
        try:
            loop.run_until_complete(web.TCPSite(runner, self.settings.host, port).start())
        except OSError as exc:
            loop.run_until_complete(runner.cleanup())
            loop.close()
            raise ConfigError(
                f"cannot listen on {self.settings.host}:{port} for /health: {exc.strerror or exc} "
                "(another service on that port? set HEALTH_PORT)"
            ) from None
        thread = threading.Thread(target=loop.run_forever, name="health", daemon=True)
        thread.start()
        log.info("health and metrics on http://%s:%d/health and /metrics", self.settings.host, port)

        def stop() -> None:
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            except Exception:  # the probe is going away with the process: never fail the stop for it
                log.exception("stopping the health port failed")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

        return stop

    def _run_headless(self, stop: threading.Event, *, watch: bool, consume: bool, needs_model: bool) -> int:
        # Loaded in the background, so a SIGTERM during a long load or warm-up is heard at once.
        self.start(load_model=needs_model)
        if needs_model and not self.holder.wait_unless(stop):
            self.stop()
            if self.holder.status == "failed":
                raise ModelLoadError(self.holder.error or "the model failed to load")
            log.info("stopping before the model is ready")
            return 0
        self.start_adapters(watch=watch, consume=consume, stop=stop)
        if stop.is_set():
            log.info("stopping before the broker was reached")
            self.stop()
            return 0
        if not self.adapters:
            log.error("nothing to run: set WATCH_DIRS or BROKER_URL")
            self.stop()
            return 2
        while not stop.wait(1.0):
            # A consumer that stopped for good (a queue declared with other arguments) leaves a
            # process that does nothing: exit 1 with its reason, so someone is told.
            failed = [a for a in self.adapters if a.health().get("state") == "failed"]
            if failed:
                reason = failed[0].health().get("last_error")
                self.stop()
                raise ConfigError(f"the {failed[0].name} consumer stopped: {reason}")
        log.info("stopping: finishing accepted work")
        self.stop()
        return 0

    # -- serve ----------------------------------------------------------------------------

    async def serve(self, *, watch: bool = True, consume: bool = True) -> None:
        """Run the HTTP API (and configured adapters) until SIGINT/SIGTERM, then drain.

        A SIGTERM before it listens (waiting for the broker, or for the model with
        LISTEN_AFTER_LOAD) ends it at once with 0, as after: the default action killed it with 143.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        halt = threading.Event()  # the same, for the threads the waits below run on

        def on_signal() -> None:
            halt.set()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        if self.settings.broker_url:
            # The consumer, the gateway or a publishing watcher will need it: wait for it now
            # (bounded by STARTUP_TIMEOUT), rather than serve without it and only log the loss.
            from .amqp_topology import wait_for_broker

            url, timeout = self.settings.broker_url, self.settings.startup_timeout
            if not await loop.run_in_executor(None, partial(wait_for_broker, url, timeout, stop=halt)):
                log.info("stopping before the broker was reached")
                return
        self.start()
        if self.settings.listen_after_load:
            # As the legacy service did: no connection is accepted until the model is ready, so
            # clients that retry on refused connections never see a 503.
            log.info("LISTEN_AFTER_LOAD: waiting for the model before listening")
            if not await loop.run_in_executor(None, self.holder.wait_unless, halt):
                await loop.run_in_executor(None, self.stop)
                if self.holder.status == "failed":
                    raise ModelLoadError(self.holder.error or "the model failed to load")
                log.info("stopping before the model is ready")
                return
        runner = self.app_runner()
        await runner.setup()
        site = self.http_site(runner)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await asyncio.get_running_loop().run_in_executor(None, self.stop)
            raise ConfigError(
                f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc} "
                "(another service on that port? set PORT)"
            ) from None
        self.serving_api = True
        log.info("listening on %s (at most %d connections)", site.name, site.limit)
        self._start_adapters_when_ready(watch=watch, consume=consume, stop=halt)
        await stop.wait()
        log.info("stopping: finishing accepted work")
        await loop.run_in_executor(None, self.stop)
        await runner.cleanup()
        log.info("stopped")

"""The `blip2-service` command. Configuration comes from the environment (and .env), as in CONTRACT §5."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .amqp_topology import BrokerUnavailable
from .captioner.loading import ModelLoadError
from .config import ConfigError, Settings, load_settings
from .domain import json_text
from .logs import setup_logging
from .store.migrate import StoreSetupError

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("blip2_service")

_EPILOG = "Settings are read from environment variables and ./.env; the README's Configuration table has them all."

# Each command: what it does, an example, and the settings that matter to it (shown by --help).
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "HTTP API on PORT (legacy /v3/analyze plus stored results and a web page), with the folder "
        "watcher when WATCH_DIRS is set and the queue consumer when BROKER_URL is set.",
        "MODEL=tiny-random WATCH_DIRS=./inbox blip2-service serve",
        "PORT PRIVATE API_KEY MODEL DEVICE DTYPE COMPILE DATABASE_URL WATCH_DIRS FILE_ROOTS BROKER_URL "
        "LOAD_WAIT_SECONDS LISTEN_AFTER_LOAD REQUEST_TIMEOUT MAX_CONNECTIONS",
    ),
    "watch": (
        "Watch folders and caption every image that arrives (no HTTP); WATCH_MODE=publish sends them "
        "to the queue instead.",
        "blip2-service watch ./inbox /srv/photos",
        "MODEL DATABASE_URL WATCH_RECURSIVE WATCH_POLLING WATCH_SETTLE_SECONDS WATCH_MODE WATCH_FOLLOW_SYMLINKS",
    ),
    "consume": (
        "Consume the RabbitMQ queue (no HTTP): a GPU worker beside others on the same queue and database.",
        "BROKER_URL=amqp://guest:guest@localhost:5672// blip2-service consume",
        "BROKER_URL QUEUE_NAME RESULTS_EXCHANGE PREFETCH MODEL DATABASE_URL FILE_ROOTS",
    ),
    "caption": (
        "Caption files or folders now, with a progress bar; one JSON line per image on stdout, results stored.",
        "blip2-service caption photos/ > captions.jsonl",
        "MODEL DEVICE DTYPE NUM_BEAMS MAX_NEW_TOKENS DATABASE_URL",
    ),
    "publish": (
        "Send images to the queue as requests (paths, or the bytes with --embed).",
        "blip2-service publish --embed --wait photos/a.jpg",
        "BROKER_URL QUEUE_NAME RESULTS_EXCHANGE",
    ),
    "reprocess": (
        "Caption stored images again with the current model and settings (new rows; the old ones are "
        "kept), reading each from a place it was seen whose file is still there; --via-queue publishes "
        "them for GPU workers instead. Selects by the stored captions' model, source, status, path prefix "
        "and time.",
        "MODEL=blip2_opt:caption_coco_opt2.7b blip2-service reprocess --model Salesforce/blip2-opt-2.7b",
        "MODEL DEVICE DTYPE NUM_BEAMS MAX_NEW_TOKENS DATABASE_URL BROKER_URL (with --via-queue)",
    ),
    "db": (
        "Database maintenance: `db upgrade` creates or migrates the schema.",
        "DATABASE_URL=postgresql+psycopg://user@db/photos blip2-service db upgrade",
        "DATABASE_URL DB_SCHEMA",
    ),
    "emoji": (
        "Show the emoji mapping of words or a caption.",
        "blip2-service emoji a man riding a wave on a surfboard",
        "AUTO_UPDATE EMOJI_MAPPINGS_URL DATA_DIR",
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2, naming the command's --help, instead of a usage block.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    what, example, settings = _COMMANDS[name]
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=what.split(";")[0].split(" (")[0].rstrip("."),
        description=what,
        epilog=f"example:\n  {example}\n\nsettings that matter here: {settings}\n{_EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blip2-service",
        description="Caption images with BLIP-2 / BLIP and map caption words to emojis.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"blip2-service {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _command(sub, "serve")
    watch = _command(sub, "watch")
    watch.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    _command(sub, "consume")
    caption = _command(sub, "caption")
    caption.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    caption.add_argument("--prompt", default=None, help="text prompt / question for BLIP-2")
    caption.add_argument("--no-store", action="store_true", help="do not read or write the store")
    caption.add_argument("--refresh", action="store_true", help="caption again even when stored")
    publish = _command(sub, "publish")
    publish.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    publish.add_argument("--embed", action="store_true", help="send the bytes (image_b64) instead of paths")
    publish.add_argument("--wait", action="store_true", help="wait for the results and print them as JSON lines")
    publish.add_argument("--prompt", default=None, help="text prompt for every request")
    publish.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results with --wait")
    again = _command(sub, "reprocess")
    again.add_argument("--model", help="only images captioned by this model (as stored, e.g. tiny-random)")
    again.add_argument("--source", choices=["http", "watch", "queue", "cli"], help="only images first seen here")
    again.add_argument("--status", choices=["succeeded", "failed"], help="only images whose caption has this status")
    again.add_argument("--path", help="only images seen under this path prefix")
    again.add_argument("--since", help="only captions created at or after this ISO 8601 time")
    again.add_argument("--until", help="only captions created before this ISO 8601 time")
    again.add_argument("--via-queue", action="store_true", help="publish the paths to the queue instead")
    db = _command(sub, "db")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION", parser_class=_Parser)
    db_sub.add_parser("upgrade", help="create or migrate the schema at DATABASE_URL (in DB_SCHEMA on Postgres)")
    emoji = _command(sub, "emoji")
    emoji.add_argument("words", nargs="+", metavar="WORDS")
    emoji.add_argument("--json", action="store_true", help="print the JSON emoji_mappings")
    return parser


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders walked recursively for image suffixes, in a stable order. The
    other files a folder holds are named on stderr by suffix, once, so that none is left out
    without a word (a .heic where the suffix was not yet known was such a file)."""
    from .imaging import IMAGE_SUFFIXES

    found: list[Path] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        for child in sorted(path.rglob("*")):
            if not child.is_file() or child.name.startswith("."):
                continue
            if child.suffix.lower() in IMAGE_SUFFIXES:
                found.append(child)
            else:
                skipped[child.suffix.lower() or "(no suffix)"] += 1
    if skipped:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in skipped.most_common())
        print(f"blip2-service: skipped, not images by their names: {kinds}", file=sys.stderr)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0].startswith("-") and given[0] not in ("-h", "--help", "--version"):
        # argparse would complain about the missing command before the unknown option.
        print(f"blip2-service: unknown option {given[0]} (see blip2-service --help)", file=sys.stderr)
        return 2
    args = _parser().parse_args(given)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"blip2-service: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    command: str = args.command
    handlers = {
        "serve": _serve,
        "watch": _watch,
        "consume": _consume,
        "caption": _caption,
        "publish": _publish,
        "db": _db,
        "reprocess": _reprocess,
        "emoji": _emoji,
    }
    try:
        return handlers[command](settings, args)
    except KeyboardInterrupt:
        return 130
    except (StoreSetupError, ModelLoadError, ConfigError, BrokerUnavailable) as exc:
        print(f"blip2-service: {exc}", file=sys.stderr)
        return 1


def _exit_without_the_loader(runtime: Runtime, code: int) -> int:
    """Stopped while the model still loads or compiles: end the process now.

    Everything accepted has been finished by then (the runtime has stopped). The loader thread
    cannot be interrupted, and left running into the interpreter's shutdown it fails (inductor's
    compile pool takes no more work) and the process aborts, after a traceback, with SIGABRT.
    """
    if runtime.holder.busy:
        log.info("stopped while the model was still %s: not waiting for it", runtime.holder.status)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from .runtime import Runtime

    runtime = Runtime(settings)
    asyncio.run(runtime.serve())
    return _exit_without_the_loader(runtime, 0)


def _watch(settings: Settings, args: argparse.Namespace) -> int:
    from .runtime import Runtime

    settings = settings.model_copy(update={"watch_dirs": [d.resolve() for d in args.dirs]})
    for folder in settings.watch_dirs:
        if not folder.is_dir():
            print(f"blip2-service: {folder} is not a folder", file=sys.stderr)
            return 2
    runtime = Runtime(settings)
    return _exit_without_the_loader(runtime, runtime.run_headless(watch=True, consume=False))


def _consume(settings: Settings, _args: argparse.Namespace) -> int:
    from .runtime import Runtime

    if not settings.broker_url:
        print(
            "blip2-service: consume needs BROKER_URL, e.g. amqp://guest:guest@localhost:5672//",
            file=sys.stderr,
        )
        return 2
    runtime = Runtime(settings)
    return _exit_without_the_loader(runtime, runtime.run_headless(watch=False, consume=True))


def _caption(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses
    from concurrent.futures import Future

    from tqdm import tqdm

    from .domain import CaptionRequest, CaptionResult, Source
    from .intake import read_path
    from .outcome import cli_line
    from .runtime import Runtime

    files = find_images(args.paths)
    if not files:
        print("blip2-service: no images found in the given paths", file=sys.stderr)
        return 1
    runtime = Runtime(settings)
    runtime.start(background_model=False)
    generation = dataclasses.replace(settings.generation(), prompt=args.prompt or None)
    failures = stored = 0
    pending: list[tuple[Path, Any]] = []

    def emit(path: Path, result: CaptionResult | BaseException) -> None:
        nonlocal failures, stored
        line = cli_line(str(path), result)
        failures += 0 if line["status"] == "succeeded" else 1
        stored += 1 if line.get("cached") else 0
        print(json_text(line), flush=True)

    try:
        with tqdm(total=len(files), unit="img", file=sys.stderr, disable=None) as bar:
            for path in files:
                try:
                    # The operator names their own files here: no FILE_ROOTS, the same reading rules.
                    found = read_path(str(path), None, settings.max_file_size)
                except Exception as exc:
                    unread: Future[CaptionResult] = Future()
                    unread.set_exception(exc)  # reported in input order with the rest
                    pending.append((path, unread))
                    bar.update()
                    continue
                request = CaptionRequest(
                    Source.CLI,
                    str(path.resolve()),
                    found.data,
                    generation,
                    store=not args.no_store,
                    refresh=args.refresh,
                    file_size=found.size,
                    file_mtime=found.mtime,
                )
                future = runtime.pipeline.submit(request, wait=True)
                future.add_done_callback(lambda _f: bar.update())
                pending.append((path, future))
                # Print in input order as results complete, keeping the pipeline full.
                while pending and pending[0][1].done():
                    done_path, done = pending.pop(0)
                    emit(done_path, done.exception() or done.result())
            for done_path, done in pending:
                error = done.exception()
                emit(done_path, error if error is not None else done.result())
    finally:
        runtime.stop()
    print(f"caption: {len(files) - failures} succeeded ({stored} already stored), {failures} failed", file=sys.stderr)
    return 1 if failures else 0


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from .publisher import publish_paths

    if not settings.broker_url:
        print(
            "blip2-service: publish needs BROKER_URL, e.g. amqp://guest:guest@localhost:5672//",
            file=sys.stderr,
        )
        return 2
    return publish_paths(
        settings,
        find_images(args.paths),
        embed=args.embed,
        wait=args.wait,
        prompt=args.prompt,
        timeout=args.timeout,
    )


def _reprocess(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import datetime

    from tqdm import tqdm

    from .domain import CaptionResult
    from .outcome import cli_line
    from .reprocess import NoReadableCopy, caption_again
    from .runtime import Runtime
    from .store.repository import CaptionFilter

    def when(name: str, raw: str | None) -> datetime | None:
        try:
            return datetime.fromisoformat(raw) if raw else None
        except ValueError:
            raise ConfigError(f"--{name}={raw!r} is not an ISO 8601 time such as 2026-11-27T10:00:00Z") from None

    filters = CaptionFilter(
        source=args.source,
        model=args.model,
        status=args.status,
        path=args.path,
        since=when("since", args.since),
        until=when("until", args.until),
    )
    runtime = Runtime(settings)
    runtime.start(background_model=False, load_model=not args.via_queue)
    try:
        chosen = runtime.store.local_copies(filters)
        if args.via_queue:
            return _reprocess_via_queue(settings, chosen)
        with tqdm(total=len(chosen), unit="img", file=sys.stderr, disable=None) as bar:

            def report(sha256: str, path: str | None, result: CaptionResult | BaseException) -> None:
                line = {**cli_line(path or "", result), "image_sha256": sha256}
                if isinstance(result, NoReadableCopy):
                    line["status"] = "skipped"
                print(json_text(line), flush=True)
                bar.update()

            summary = caption_again(
                runtime.pipeline, chosen, settings.generation(), max_bytes=settings.max_file_size, on_done=report
            )
        for sha256 in summary.skipped:
            print(f"skipped {sha256}: no readable file left", file=sys.stderr)
        print(summary.line(), file=sys.stderr)
        return 0 if summary.failed == 0 else 1
    finally:
        runtime.stop()


def _reprocess_via_queue(settings: Settings, chosen: list[tuple[str, list[str]]]) -> int:
    from .amqp_topology import Topology, wait_for_broker
    from .publisher import QueuePublisher
    from .reprocess import paths_to_publish

    if not settings.broker_url:
        raise ConfigError("--via-queue needs BROKER_URL (the queue GPU workers consume)")
    wait_for_broker(settings.broker_url, settings.startup_timeout)
    publisher = QueuePublisher(settings.broker_url, Topology(settings.queue_name, settings.results_exchange))
    sent, skipped = 0, []
    try:
        for sha256, path in paths_to_publish(chosen):
            if path is None:
                skipped.append(sha256)
                continue
            publisher.publish({"path": path, "id": f"reprocess:{sha256}"})
            sent += 1
    finally:
        publisher.close()
    for sha256 in skipped:
        print(f"skipped {sha256}: no readable file left", file=sys.stderr)
    print(
        f"reprocess: {sent} published to {settings.queue_name}, {len(skipped)} skipped (no readable file)",
        file=sys.stderr,
    )
    return 0


def _db(settings: Settings, _args: argparse.Namespace) -> int:
    from .store import make_engine
    from .store.migrate import current_revision, upgrade_when_reachable

    engine = make_engine(settings.database_url, schema=settings.db_schema)
    upgrade_when_reachable(engine, settings.startup_timeout)
    print(f"database at revision {current_revision(engine)}")
    return 0


def _emoji(settings: Settings, args: argparse.Namespace) -> int:
    from .emoji import build_mapper

    mapper = build_mapper(settings)
    mappings = mapper.map(" ".join(args.words))
    if args.json:
        print(json_text([m.as_dict() for m in mappings]))
    else:
        for m in mappings:
            print(f"{m.emoji}\t{m.word}")
        if not mappings:
            print("(no emoji for these words)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

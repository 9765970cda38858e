"""Shared fixtures: the real tiny-random model (built once a session), stores, pipelines, images.

Services: Postgres and RabbitMQ tests skip with the reason when the service is
absent, and fail instead when CI=true, so CI can never pass by skipping.
"""

from __future__ import annotations

import io
import os
import socket
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import LoadedModel, load_model
from blip2_service.config import Settings
from blip2_service.emoji import load_bundled
from blip2_service.emoji.mapper import EmojiMapper
from blip2_service.metrics import Metrics
from blip2_service.pipeline import CaptionPipeline, PipelineLimits
from blip2_service.store import CaptionRepository, make_engine, upgrade

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Captured output as text a worker can send: a test that names a non-UTF-8 file logs its name
    with lone surrogates, which pytest-xdist cannot pass from its worker (an INTERNALERROR that
    ended the run)."""
    report: pytest.TestReport = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `broker` every test of a module that talks to the real broker (its text names
    AMQP_URL; some import it inside a fixture). `make test` runs the others on two pytest-xdist
    workers and these after them, one at a time: three restart the broker and one changes its
    max_message_size, which a broker test beside them would take for a failure. (xdist's own
    grouping, --dist loadgroup, sets a node id pytest 9.2 no longer reads: it grouped nothing.)"""
    names: dict[Path, bool] = {}
    for item in items:
        path = item.path
        if path not in names:
            names[path] = "AMQP_URL" in path.read_text(encoding="utf-8")
        if names[path]:
            item.add_marker(pytest.mark.broker)


def service_missing(what: str, detail: str) -> None:
    message = f"{what} is not reachable ({detail})"
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)


def wait_until(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `check` until it holds; fail naming what never happened."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def delete_topology(broker_url: str, queue_name: str, *extra_queues: str) -> None:
    """Remove what a test's service declared for `queue_name` (its queues, and the exchanges named
    `queue_name.results` and `.dead`), and `extra_queues`. A failed delete poisons its channel:
    take a new one."""
    from kombu import Connection

    from blip2_service.amqp_topology import Topology

    topology = Topology(queue_name, f"{queue_name}.results")
    with Connection(broker_url) as conn:
        channel = conn.channel()
        for name in (topology.queue_name, topology.interactive_name, topology.dead_name, *extra_queues):
            try:
                channel.queue_delete(name)
            except Exception:
                channel = conn.channel()
        for name in (topology.results_exchange_name, topology.dead_name):
            try:
                channel.exchange_delete(name)
            except Exception:
                channel = conn.channel()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- images ---------------------------------------------------------------------------------


def image_bytes(seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A distinct random picture per seed (random pixels make distinct captions on tiny-random)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return image_bytes


# -- model ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_model(data_dir: Path) -> LoadedModel:
    """The real BLIP-2 code on a small random checkpoint, saved and loaded via from_pretrained."""
    return load_model("tiny-random", data_dir=data_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def mapper() -> EmojiMapper:
    table = load_bundled()
    return EmojiMapper(table.table, table.stopwords)


@pytest.fixture
def loaded_holder(tiny_model: LoadedModel) -> ModelHolder:
    holder = ModelHolder(lambda: tiny_model)
    holder.load_now()
    return holder


# -- stores ---------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'blip2.db'}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        service_missing("PostgreSQL", f"{PG_ADMIN_URL}: {str(exc).splitlines()[0]}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database per test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"blip2_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run a test on both engines."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(db_url: str) -> Iterator[CaptionRepository]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield CaptionRepository(engine)
    engine.dispose()


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[CaptionRepository]:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    yield CaptionRepository(engine)
    engine.dispose()


# -- pipeline -------------------------------------------------------------------------------


@pytest.fixture
def make_pipeline(loaded_holder: ModelHolder, mapper: EmojiMapper) -> Iterator[Callable[..., CaptionPipeline]]:
    made: list[CaptionPipeline] = []

    def factory(store: CaptionRepository | None = None, **limits: Any) -> CaptionPipeline:
        defaults: dict[str, Any] = {"batch_max_size": 8, "batch_max_wait_s": 0.02, "max_pending": 64}
        defaults.update(limits)
        pipeline = CaptionPipeline(
            holder=loaded_holder,
            mapper=mapper,
            store=store,
            limits=PipelineLimits(**defaults),
            metrics=Metrics(),
        )
        pipeline.start()
        made.append(pipeline)
        return pipeline

    yield factory
    for pipeline in made:
        pipeline.stop(timeout=30)


@pytest.fixture
def settings_factory(data_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": "tiny-random",
            "dtype": "float32",
            "device": "cpu",
            "data_dir": data_dir,
            "database_url": f"sqlite:///{tmp_path / 'svc.db'}",
            "num_beams": 2,
            "max_new_tokens": 8,
            "auto_update": False,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return factory

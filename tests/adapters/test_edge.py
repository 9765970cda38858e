"""The HTTP edge under attack: path races, every spelling of an internal address, slow clients,
inputs that used to answer 500, and what /health, stored URLs and CORS give away by default."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from blip2_service.domain import Forbidden, NotFound
from blip2_service.fetching import UrlFetcher
from blip2_service.intake import AddressPolicy, parse_host, parse_networks, read_path
from blip2_service.runtime import Runtime

from ..conftest import image_bytes, service_missing

# -- local paths ---------------------------------------------------------------------------------


def test_a_file_swapped_for_a_symlink_never_leaks_a_byte_from_outside(tmp_path: Path) -> None:
    """A thread flips the name between a file inside the roots and a symlink to a secret outside,
    while 200 reads run: each read gets the inside bytes or a refusal, never the secret."""
    root = tmp_path / "inbox"
    root.mkdir()
    inside, secret = b"inside" * 100, b"SECRET" * 100
    (tmp_path / "secret.jpg").write_bytes(secret)
    (root / "real.jpg").write_bytes(inside)
    name = root / "x.jpg"
    stop = threading.Event()
    outcomes: dict[str, int] = {"inside": 0, "refused": 0}
    thread = threading.Thread(target=_swapper, args=(root, tmp_path, name, stop), daemon=True)
    thread.start()
    try:
        for _ in range(200):
            try:
                data = read_path(str(name), [root.resolve()], 10_000).data
            except (Forbidden, NotFound):
                outcomes["refused"] += 1
                continue
            assert data != secret, "read a file outside the roots"
            assert data == inside
            outcomes["inside"] += 1
    finally:
        stop.set()
        thread.join(5)
    assert outcomes["inside"] + outcomes["refused"] == 200


def _swapper(root: Path, outside: Path, name: Path, stop: threading.Event) -> None:
    """Atomically point `name` at the inside file, then at the secret, as fast as possible."""
    tmp = root / ".swap"
    targets = [root / "real.jpg", outside / "secret.jpg"]
    i = 0
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(targets[i % 2], tmp)
        os.replace(tmp, name)
        i += 1


@pytest.mark.parametrize(
    ("given", "status", "fragment"),
    [
        ("x\x00.jpg", 400, "NUL byte"),
        ("loop.jpg", 404, "loop of symbolic links"),
        ("sub", 400, "not a regular file"),
        ("missing.jpg", 404, "File not found"),
        ("../secret.jpg", 403, "outside the allowed folders"),
        ("y" * 5000, 400, "at most 4096"),
    ],
)
async def test_bad_paths_get_their_status_not_500(
    service: Any, roots: Path, given: str, status: int, fragment: str
) -> None:
    if not os.path.lexists(roots / "loop.jpg"):
        os.symlink(roots / "loop.jpg", roots / "loop.jpg")
    client = await service()
    path = given if len(given) > 100 else str(roots / given)
    resp = await client.get("/v3/analyze", params={"file": path})
    assert resp.status == status, await resp.text()
    assert fragment in (await resp.json())["error"]["message"]


# -- addresses -----------------------------------------------------------------------------------

# Every spelling of 127.0.0.2, the "internal" address of these tests (127.0.0.1 is allowed).
SPELLINGS = [
    "127.0.0.2",
    "127.2",
    "0177.0.0.2",
    "2130706434",
    "0x7f.0.0.2",
    "[::ffff:127.0.0.2]",
    "[::127.0.0.2]",
    "[64:ff9b::127.0.0.2]",
    "[64:ff9b:1::7f00:2]",
    "[2002:7f00:2::1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffd]",
]


def test_every_spelling_parses_to_an_address_the_policy_refuses() -> None:
    policy = AddressPolicy(allow_networks=parse_networks(["127.0.0.1/32"]))
    for spelling in SPELLINGS:
        ip = parse_host(spelling)
        assert ip is not None, spelling
        assert policy.refusal(ip) is not None, spelling
    assert policy.refusal(parse_host("127.0.0.1")) is None  # type: ignore[arg-type]
    assert "metadata" in (AddressPolicy(allow_private=True).refusal(parse_host("169.254.169.254")) or "")  # type: ignore[arg-type]
    assert "metadata" in (AddressPolicy(allow_private=True).refusal(parse_host("[::ffff:169.254.169.254]")) or "")  # type: ignore[arg-type]
    assert AddressPolicy().refusal(parse_host("93.184.215.14")) is None  # type: ignore[arg-type]


@pytest.fixture
async def victim(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Any:
    """An 'internal' server on 127.0.0.2 that records whether anything reached it."""
    reached: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        reached.append(str(request.url))
        return web.Response(body=image_bytes(9), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    server = await aiohttp_server(app, host="127.0.0.2")
    server.reached = reached  # type: ignore[attr-defined]
    return server


@pytest.fixture
async def redirector(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    async def to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["target"])

    async def hop(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        n = int(request.query.get("n", "0"))
        raise web.HTTPFound(f"/hop?n={n + 1}")

    app = web.Application()
    app.router.add_get("/to", to)
    app.router.add_get("/hop", hop)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_internal_addresses_are_refused_in_every_spelling_directly_and_after_a_redirect(
    service: Any, victim: Any, redirector: TestServer
) -> None:
    fetcher = UrlFetcher(
        timeout=5, max_bytes=10_000_000, policy=AddressPolicy(allow_networks=parse_networks(["127.0.0.1/32"]))
    )
    client = await service(fetcher=fetcher)
    for spelling in SPELLINGS:
        target = f"http://{spelling}:{victim.port}/img.jpg"
        direct = await client.get("/v3/analyze", params={"url": target})
        assert direct.status == 403, (spelling, await direct.text())
        hop = await client.get("/v3/analyze", params={"url": str(redirector.make_url("/to").with_query(target=target))})
        assert hop.status == 403, (spelling, await hop.text())
    assert victim.reached == []
    allowed = await client.get("/v3/analyze", params={"url": f"http://127.0.0.1:{victim.port}/x"})
    assert allowed.status == 502  # 127.0.0.1 is allowed here, and nothing listens there on that port


async def test_one_deadline_covers_the_whole_fetch_with_its_redirects(service: Any, redirector: TestServer) -> None:
    client = await service(allow_private_urls=True, url_timeout=1.5)
    started = time.monotonic()
    resp = await client.get("/v3/analyze", params={"url": str(redirector.make_url("/hop"))})
    took = time.monotonic() - started
    assert resp.status == 502 and "URL_TIMEOUT" in (await resp.json())["error"]["message"]
    assert took < 2.9  # five hops of 0.6 s each would take 3 s


async def test_stored_urls_carry_no_credentials(service: Any, images_site: TestServer) -> None:
    client = await service(allow_private_urls=True, api_key="k")
    url = images_site.make_url("/img.jpg").with_user("alice").with_password("hunter2")
    resp = await client.get("/v3/analyze", params={"url": str(url)}, headers={"X-API-Key": "k"})
    assert resp.status == 200
    listed = await (await client.get("/captions", headers={"X-API-Key": "k"})).text()
    assert "hunter2" not in listed and "alice" not in listed
    assert f"127.0.0.1:{images_site.port}/img.jpg" in listed


# -- slow clients ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_slow_headers_and_a_never_finished_body_are_cut_off_at_the_deadline(
    settings_factory: Callable[..., Any], loaded_holder: Any, tmp_path: Path
) -> None:
    runtime = Runtime(settings_factory(request_timeout=1.5), holder=loaded_holder)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.start)
    runner = runtime.app_runner()
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def slowloris() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):
            await asyncio.sleep(0.3)
            if reader.at_eof():
                break
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except ConnectionError:
                break
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return time.monotonic() - started

    async def unfinished_chunks() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(
            b"POST /v3/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\n\xff\xd8\xff\xe0\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 8)
        answered = time.monotonic() - started
        await asyncio.wait_for(reader.read(), 8)  # and the connection is closed after it
        writer.close()
        return answered, answer

    async def trickled_form(opening: bytes) -> tuple[float, bytes]:
        """A multipart form that opens with `opening`, then drips a byte every 0.2 s: a field
        before `file`, or a part's headers, were read with no deadline, for as long as it dripped."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(
            b"POST /v3/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(opening), opening)
        )
        answer = b""
        while not answer and time.monotonic() - started < 8:
            try:
                writer.write(b"1\r\na\r\n")
                await writer.drain()
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.2)
            except TimeoutError:
                continue
            except (ConnectionError, asyncio.IncompleteReadError):
                break
        writer.close()
        return time.monotonic() - started, answer

    try:
        took = await asyncio.gather(*(slowloris() for _ in range(5)))
        assert all(t < 4 for t in took), took
        elapsed, answer = await unfinished_chunks()
        assert elapsed < 4 and answer.startswith(b"HTTP/1.1 408"), answer[:80]
        for opening in (
            b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\n',  # a field before `file`
            b"--XyZ\r\nContent-Disposition: form-data; name=",  # a part's headers
        ):
            elapsed, answer = await trickled_form(opening)
            assert elapsed < 4 and answer.startswith(b"HTTP/1.1 408"), (opening, elapsed, answer[:80])
    finally:
        await runner.cleanup()
        await loop.run_in_executor(None, runtime.stop)


async def test_past_max_connections_a_new_client_gets_a_readable_503_and_is_served_once_one_closes(
    settings_factory: Callable[..., Any], loaded_holder: Any
) -> None:
    runtime = Runtime(settings_factory(max_connections=4, private=True), holder=loaded_holder)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.start)
    runner = runtime.app_runner()
    await runner.setup()
    site = runtime.http_site(runner, port=_free_port())
    await site.start()
    url = f"http://127.0.0.1:{site.port}/v3/analyze"
    upload = {"data": image_bytes(61), "headers": {"Content-Type": "image/jpeg"}}
    held = []
    try:
        for _ in range(4):  # clients that never finish their headers
            _reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            held.append(writer)
        assert runner.server is not None
        deadline = loop.time() + 10
        while len(runner.server.connections) < 4 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.post(url, **upload) as resp:  # its body is sent, drained, and the 503 read
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert "MAX_CONNECTIONS=4" in (await resp.json())["error"]["message"]
            held.pop().close()
            status = 503
            while status == 503 and loop.time() < deadline + 10:
                async with session.post(url, **upload) as resp:
                    status = resp.status
            assert status == 200
        assert runtime.metrics.registry.get_sample_value("blip2_http_connections_refused_total") >= 1
    finally:
        for writer in held:
            writer.close()
        await runner.cleanup()
        await loop.run_in_executor(None, runtime.stop)


# -- inputs that used to answer 500 -----------------------------------------------------------------


async def test_malformed_bodies_and_headers_get_400_or_401(service: Any) -> None:
    client = await service(api_key="k")
    key = {"X-API-Key": "k"}
    cases: list[tuple[str, dict[str, str], bytes, int]] = [
        ("gzip that is not gzip", {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}, b"plain bytes", 400),
        ("multipart, no boundary", {"Content-Type": "multipart/form-data"}, b"--x\r\n\r\n", 400),
        ("multipart, body without it", {"Content-Type": "multipart/form-data; boundary=abc"}, b"nothing here", 400),
        ("multipart, boundary over 70", {"Content-Type": "multipart/form-data; boundary=" + "b" * 80}, b"--", 400),
    ]
    for what, headers, body, status in cases:
        resp = await client.post("/v3/analyze", data=body, headers={**headers, **key})
        assert resp.status == status, (what, resp.status, await resp.text())
        assert (await resp.json())["status"] == "error"
    host, port = client.server.host, client.server.port
    for header in (b"X-API-Key: caf\xc3\xa9\xe2\x98\x83", b"Authorization: Bearer caf\xe9", b"X-API-Key: \xff\xfe"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /captions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
        status = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).split()[1]
        writer.close()
        assert status in (b"401", b"400"), (header, status)


async def test_an_upload_whose_file_name_is_not_utf8_is_captioned_and_listed_under_a_readable_name(
    service: Any, make_image: Callable[..., bytes]
) -> None:
    client = await service()
    image = make_image(41)
    for name, shown in ((b"\xff\xfe.jpg", r"upload:\xff\xfe.jpg"), ("café.jpg".encode(), "upload:café.jpg")):
        body = (
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="' + name + b'"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--B--\r\n"
        )
        resp = await client.post(
            "/v3/analyze?refresh=true", data=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
        )
        assert resp.status == 200, await resp.text()
        record = await (await client.get(f"/captions/{(await resp.json())['metadata']['record_id']}")).json()
        assert record["source_ref"] == shown


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/captions?cursor=" + __import__("base64").urlsafe_b64encode(b"id:" + b"9" * 30).decode(), 400),
        ("/captions?since=9999-12-31T23:00:00-05:00", 200),  # clamped to the end of time: no items
        ("/captions?until=0001-01-01T00:00:00%2B05:00", 200),
        ("/captions/" + "9" * 30, 404),
        ("/captions/²", 400),
        ("/captions/3212062196946906906624", 404),
    ],
)
async def test_stored_results_routes_never_answer_500_to_impossible_values(
    service: Any, path: str, status: int
) -> None:
    client = await service()
    resp = await client.get(path)
    assert resp.status == status, await resp.text()


# -- what the defaults give away --------------------------------------------------------------------


async def test_health_without_the_key_shows_status_only(service: Any, roots: Path) -> None:
    client = await service(api_key="k", watch_dirs=str(roots))
    plain = await (await client.get("/health")).json()
    assert plain["status"] == "healthy" and plain["store"] == "up"
    assert "sources" not in plain and str(roots) not in str(plain)
    full = await (await client.get("/health", headers={"X-API-Key": "k"})).json()
    assert "sources" in full
    open_details = await service(health_details=True)
    assert "sources" in await (await open_details.get("/health")).json()


async def test_no_cors_headers_unless_origins_are_configured(service: Any) -> None:
    client = await service()
    resp = await client.get("/captions", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    pre = await client.options(
        "/captions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "Access-Control-Allow-Origin" not in pre.headers


def _make_read_only(path: Path, read_only: bool) -> None:
    """Read-only for this process: chmod does not stop root, the immutable attribute does."""
    if os.geteuid() != 0:
        path.chmod(0o444 if read_only else 0o644)
        return
    done = subprocess.run(["chattr", "+i" if read_only else "-i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} read-only here: {done.stderr.decode().strip()}")


async def test_a_read_only_database_recovers_once_writable_and_health_names_it_meanwhile(
    service: Any, make_image: Callable[..., bytes]
) -> None:
    client = await service()
    runtime = client.runtime  # type: ignore[attr-defined]
    db = Path(runtime.store.engine.url.database)
    runtime.store.engine.dispose()  # the next connections open the file as it is now
    _make_read_only(db, True)
    try:
        post = await client.post("/v3/analyze", data=make_image(501), headers={"Content-Type": "image/jpeg"})
        assert post.status == 503 and "readonly" in (await post.json())["error"]["message"]
        health = await client.get("/health")
        body = await health.json()
        assert health.status == 503 and body["store"] == "down" and body["unavailable"] == ["store"]
    finally:
        _make_read_only(db, False)
    started = time.monotonic()
    post = await client.post("/v3/analyze", data=make_image(502), headers={"Content-Type": "image/jpeg"})
    assert post.status == 200 and time.monotonic() - started < 10
    assert (await client.get("/health")).status == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of its own, 2 MiB (tmpfs), for the test to fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:  # a laptop without root skips; CI runs as root and must run it
        service_missing("a small tmpfs to fill", f"mount needs root: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write until the filesystem says it is full; returns the file that holds the space."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler


async def test_a_database_locked_by_another_program_is_503_with_the_reason_then_writes_resume(
    service: Any, make_image: Callable[..., bytes]
) -> None:
    client = await service()
    db = Path(client.runtime.store.engine.url.database)  # type: ignore[attr-defined]
    other = sqlite3.connect(db, isolation_level=None)  # a `sqlite3` shell left inside a transaction
    other.execute("BEGIN EXCLUSIVE")
    try:
        post = await client.post("/v3/analyze", data=make_image(511), headers={"Content-Type": "image/jpeg"})
        body = await post.json()
        assert post.status == 503 and "database is locked" in body["error"]["message"], body
        assert post.headers["Retry-After"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    post = await client.post("/v3/analyze", data=make_image(511), headers={"Content-Type": "image/jpeg"})
    assert post.status == 200 and (await post.json())["metadata"]["record_id"]


async def test_a_full_disk_is_503_with_the_reason_and_the_store_takes_writes_once_space_is_freed(
    service: Any, small_disk: Path, make_image: Callable[..., bytes]
) -> None:
    """The probe behind /health (a rolled-back no-op write) needs no new space: it said "up" while
    every save failed with "database or disk is full"."""
    client = await service(database_url=f"sqlite:///{small_disk / 'captions.db'}", health_details=True)
    first = await client.post("/v3/analyze", data=make_image(601), headers={"Content-Type": "image/jpeg"})
    assert first.status == 200
    assert (await client.get("/health")).status == 200  # a small disk with room is not "full"
    filler = _fill(small_disk)
    try:
        post = await client.post("/v3/analyze", data=make_image(602), headers={"Content-Type": "image/jpeg"})
        body = await post.json()
        assert post.status == 503 and "full" in body["error"]["message"], body
        assert "Retry-After" in post.headers
        health = await client.get("/health")
        details = await health.json()
        assert health.status == 503 and details["unavailable"] == ["store"] and "full" in details["store_error"]
    finally:
        filler.unlink()
    post = await client.post("/v3/analyze", data=make_image(602), headers={"Content-Type": "image/jpeg"})
    assert post.status == 200
    assert (await client.get("/health")).status == 200
    listed = await (await client.get("/captions")).json()
    assert len(listed["items"]) == 2

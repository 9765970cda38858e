"""The one way in: every door turns what it received into image bytes here, under one policy.

HTTP `?file=`, queue `path`s, watched folders and the CLI read local files through `read_path`;
uploads through `read_stream`; URLs are checked by `AddressPolicy` (used by `fetching.py` for the
literal host, every redirect hop and every DNS answer); prompts by `check_prompt`. A guard fixed
here is fixed for every door.

Paths are never checked by name and then opened by name again: `read_path` opens the file once
and checks the real path *of the open descriptor* (and that it is a regular file) before reading
from that same descriptor, so swapping the file for a symlink between check and use reads
nothing from outside the roots. A cheap check on the resolved name runs first as well, so a
caller cannot probe which files exist outside the roots by telling 403 from 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from .domain import BadInput, Forbidden, NotFound, RequestTimedOut, TooLarge, has_unwritable

MAX_PATH_CHARS = 4096
MAX_PROMPT_CHARS = 500

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- local files --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    data: bytes
    real_path: str
    size: int
    mtime: float


def _within(real: str, roots: Iterable[Path]) -> bool:
    return any(real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep) for root in roots)


def _fd_path(fd: int) -> str | None:
    """The real path of an open descriptor (Linux); None where the platform cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def read_path(path: str, roots: Sequence[Path] | None, max_bytes: int, *, what: str = "file") -> LocalFile:
    """Read a whole local file that lies (symlinks followed) inside one of `roots`.

    `roots=None` means any path (the CLI, where the operator names their own files, and watched
    folders with WATCH_FOLLOW_SYMLINKS=true). Raises BadInput (400), Forbidden (403), NotFound
    (404) or TooLarge (413), each with one line that says what to do.
    """
    if not path:
        raise BadInput(f"The {what} path is empty; give the image's path")
    if "\x00" in path:
        raise BadInput(f"The {what} path contains a NUL byte")
    if len(path) > MAX_PATH_CHARS:
        raise BadInput(f"The {what} path is {len(path)} characters; at most {MAX_PATH_CHARS} are allowed")
    absolute = os.path.abspath(os.path.expanduser(path))
    if roots is not None:
        if not roots:
            raise Forbidden(
                f"Reading local files is disabled: set FILE_ROOTS (or WATCH_DIRS) to the folders "
                f"images may be read from; {path} was refused"
            )
        if not _within(os.path.realpath(absolute), roots):
            raise Forbidden(_outside(path, roots))
    try:
        fd = os.open(absolute, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise _open_error(path, exc) from None
    real: str | None = None
    try:
        if roots is not None:
            real = _fd_path(fd)
            if real is not None and not _within(real, roots):
                raise Forbidden(_outside(path, roots))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise TooLarge(f"{path} is {info.st_size} bytes, over MAX_FILE_SIZE={max_bytes}; send a smaller image")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"{path} grew over MAX_FILE_SIZE={max_bytes} bytes while being read")
        return LocalFile(b"".join(chunks), real or absolute, total, info.st_mtime)
    except OSError as exc:
        raise _open_error(path, exc) from None
    finally:
        os.close(fd)


def _outside(path: str, roots: Sequence[Path]) -> str:
    allowed = ", ".join(str(r) for r in roots)
    return f"{path} is outside the allowed folders ({allowed}); see FILE_ROOTS"


def _open_error(path: str, exc: OSError) -> BadInput | Forbidden | NotFound:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"File not found: {path}")
    if exc.errno == errno.ELOOP:
        return NotFound(f"{path} is a loop of symbolic links, not a file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(f"Permission denied reading {path}")
    if exc.errno == errno.ENAMETOOLONG:
        return BadInput(f"The path {path[:80]}... is too long for the file system")
    return NotFound(f"Cannot read {path}: {exc.strerror or exc}")


# -- streams ------------------------------------------------------------------------------------


async def read_stream(
    read_chunk: Callable[[], Awaitable[bytes]], max_bytes: int, *, deadline: float | None = None
) -> bytes:
    """Read a body chunk by chunk, refusing it past `max_bytes` (413) or past the loop time `deadline` (408)."""
    chunks: list[bytes] = []
    total = 0
    loop = asyncio.get_running_loop()
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise _too_slow()
        try:
            async with asyncio.timeout(remaining):
                chunk = await read_chunk()
        except TimeoutError:
            raise _too_slow() from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"The upload is over MAX_FILE_SIZE={max_bytes} bytes; send a smaller image")
        chunks.append(chunk)


@contextlib.asynccontextmanager
async def body_deadline(deadline: float) -> AsyncIterator[None]:
    """The whole body by the loop time `deadline` (408 past it), its framing included: a multipart
    form's part headers and the fields before `file`, which a client could trickle for ever where
    only the image's own bytes were timed."""
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        raise _too_slow() from None


def _too_slow() -> RequestTimedOut:
    return RequestTimedOut("The request body did not arrive within REQUEST_TIMEOUT; send it again, faster")


def check_size(declared: int | None, max_bytes: int) -> None:
    """Refuse a body by its declared length before reading it (a multipart envelope gets 64 KiB)."""
    if declared is not None and declared > max_bytes + 65536:
        raise TooLarge(f"The request body is {declared} bytes, over MAX_FILE_SIZE={max_bytes}")


# -- prompts ------------------------------------------------------------------------------------


def check_prompt(prompt: object) -> str | None:
    """The one prompt rule: an optional string of at most MAX_PROMPT_CHARS characters, trimmed.

    A NUL or a lone surrogate (a JSON message may carry "\\ud800") is refused here: the tokenizer
    cannot take a lone surrogate, and would fail the whole batch the prompt rides in, not just
    its own request.
    """
    if prompt is None or prompt == "":
        return None
    if not isinstance(prompt, str):
        raise BadInput("prompt must be a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if has_unwritable(prompt):
        raise BadInput("prompt holds a NUL or a lone surrogate; send it as plain UTF-8 text")
    return prompt.strip() or None


# -- URLs and the addresses they reach -----------------------------------------------------------

# Cloud metadata services: refused always, whatever ALLOW_PRIVATE_URLS or URL_ALLOW_NETWORKS say.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.170.23", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: IP) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 spelling can carry: mapped, compatible, NAT64, 6to4, Teredo."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def parse_host(host: str) -> IP | None:
    """The address a URL's host names literally, in any spelling a resolver accepts (`127.1`,
    `0177.0.0.1`, `2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`), or None for a name."""
    bare = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses `?url=` may reach: public ones, plus ALLOW_PRIVATE_URLS / URL_ALLOW_NETWORKS."""

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()

    def refusal(self, ip: IP) -> str | None:
        """Why `ip` may not be fetched from ("an internal address", ...), or None when it may."""
        candidates: list[IP] = [ip, *embedded_ipv4(ip)]
        for candidate in candidates:
            if candidate in METADATA_ADDRESSES:
                return "a cloud metadata address (always refused)" + _carries(ip, candidate)
        if self.allow_private:
            return None
        for candidate in candidates:
            if any(candidate in net for net in self.allow_networks if candidate.version == net.version):
                return None
        if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        for candidate in candidates:
            if not candidate.is_global or candidate.is_multicast:
                return "an internal address" + _carries(ip, candidate)
        return None


def _carries(ip: IP, inner: IP) -> str:
    return "" if inner is ip else f" (it carries {inner})"


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def public_url(url: str) -> str:
    """A URL as it may be stored and shown: without the user name and password it may carry."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return url
    if parsed.user is None and parsed.password is None:
        return url
    return str(parsed.with_user(None))

"""The open-file limit and the connection ceiling drawn from it."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from blip2_service.http_api.capped_site import AUTO_CEILING, connection_ceiling, raise_open_file_limit


@pytest.fixture
def restored_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(restored_limit: tuple[int, int]) -> None:
    _soft, hard = restored_limit
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    raised = raise_open_file_limit()
    assert raised > 256
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised


@pytest.mark.parametrize(
    ("configured", "open_files", "ceiling"),
    [(0, 1024, 512), (0, 1 << 20, AUTO_CEILING), (0, 1, 1), (7, 1024, 7), (50_000, 1024, 50_000)],
)
def test_max_connections_is_half_the_open_files_unless_set(configured: int, open_files: int, ceiling: int) -> None:
    assert connection_ceiling(configured, open_files) == ceiling

"""The open-files soft limit is raised to the hard limit."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from pilotfish.common.limits import open_files_limit, raise_open_files_limit


@pytest.fixture
def restore_nofile() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_soft_limit_raised_to_hard(restore_nofile: tuple[int, int]) -> None:
    soft, hard = restore_nofile
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    raised = raise_open_files_limit()
    assert raised > 256
    assert open_files_limit() == raised
    if hard != resource.RLIM_INFINITY:
        assert raised == hard

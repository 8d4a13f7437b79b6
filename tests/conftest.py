"""Shared fixtures: one embedded cluster per test module, started as a real process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.proxy import native
from tests.cluster import Cluster, start_cluster


def pytest_sessionstart(session: pytest.Session) -> None:
    # An extension older than its source would hide the edit from every test.
    if stale := native.stale():
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    "run `make native`", returncode=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(Path(tmp_path_factory.mktemp("cluster")), "--watch-history", "200",
                      "--bookmark-interval", "0.5", "--service-cidr", "10.96.0.0/16")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "state", "--watch-history", "50")
    try:
        yield c
    finally:
        c.stop()

"""Fixtures shared by the control-plane tests: a trust anchor with its issuer, and
one workload identity under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.identity.static import StaticIdentity
from tests.meshproxy import Trust


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    return Trust.create(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def workload(trust: Trust) -> StaticIdentity:
    files = trust.workload("default", "web")
    return StaticIdentity.load(Path(files["certFile"]), Path(files["keyFile"]), trust.bundle)

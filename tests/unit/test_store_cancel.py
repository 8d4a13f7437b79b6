"""A write whose request is cancelled mid-commit (its client went away) is still
recorded in memory exactly as on disk, so later writes get fresh resourceVersions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from localcluster.store import EventType, Store, Write

KEY = ("", "configmaps")


def _write(name: str) -> Write:
    return Write(KEY, "default", name, {"metadata": {"name": name}}, EventType.ADDED)


async def test_a_cancelled_commit_is_kept_in_step_with_the_disk(tmp_path: Path) -> None:
    store = Store(tmp_path / "cluster.db", synchronous="FULL")
    try:
        async def commit(name: str) -> None:
            async with store.lock:
                await store.commit([_write(name)])

        task = asyncio.create_task(commit("first"))
        await asyncio.sleep(0)  # into the commit: the write is on its thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        first = store.get(KEY, "default", "first")
        assert first is not None  # on disk, so also in memory
        await commit("second")  # would fail on a reused resourceVersion
        second = store.get(KEY, "default", "second")
        assert second is not None
        assert int(second["metadata"]["resourceVersion"]) > \
            int(first["metadata"]["resourceVersion"])
    finally:
        store.close()
    reopened = Store(tmp_path / "cluster.db")
    try:
        assert reopened.get(KEY, "default", "first") is not None
        assert reopened.rv == int(second["metadata"]["resourceVersion"])
    finally:
        reopened.close()

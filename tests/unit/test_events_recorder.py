"""The event recorder against a real registry: kube's dedup (count and
lastTimestamp on one Event), aggregation of similar events, and the spam filter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from localcluster.admission import Admission
from localcluster.auth import TokenAuthority
from localcluster.catalog import Catalog
from localcluster.events import EVENTS, EventRecorder
from localcluster.registry import Registry
from localcluster.resources import BUILTIN
from localcluster.store import Store

TYPES = {rt.key: rt for rt in BUILTIN}


class SteppedClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
def registry(tmp_path: Path, clock: SteppedClock) -> Iterator[Registry]:
    store = Store(tmp_path / "cluster.db", synchronous="OFF")
    catalog = Catalog()
    tokens = TokenAuthority(issuer="https://kubernetes.default.svc", admin_token="admin",
                            key=ec.generate_private_key(ec.SECP256R1()), lookup=store.get,
                            clock=clock)
    admission = Admission(store, catalog, service_cidr="10.96.0.0/16", tokens=tokens,
                          ca_pem=b"", clock=clock)
    try:
        yield Registry(store, catalog, admission, clock=clock)
    finally:
        store.close()


async def _service(registry: Registry) -> dict[str, Any]:
    await registry.create(TYPES[("", "namespaces")], "", {"metadata": {"name": "default"}})
    out = await registry.create(TYPES[("", "services")], "default", {
        "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    return out.obj


def _events(registry: Registry) -> list[dict[str, Any]]:
    return list(registry.list_objects(EVENTS, "default")["items"])


async def test_a_repeated_event_is_counted_on_one_object(registry: Registry,
                                                         clock: SteppedClock) -> None:
    svc = await _service(registry)
    recorder = EventRecorder(registry, component="endpoint-slice-controller", clock=clock)
    await recorder.warning(svc, "FailedToUpdateEndpointSlices", "boom")
    first = _events(registry)
    assert len(first) == 1
    (ev,) = first
    assert ev["involvedObject"] == {"kind": "Service", "namespace": "default", "name": "web",
                                    "uid": svc["metadata"]["uid"], "apiVersion": "v1",
                                    "resourceVersion": svc["metadata"]["resourceVersion"]}
    assert ev["metadata"]["name"].startswith("web.")
    assert (ev["type"], ev["reason"], ev["message"], ev["count"]) == (
        "Warning", "FailedToUpdateEndpointSlices", "boom", 1)
    assert ev["source"] == {"component": "endpoint-slice-controller"}
    assert ev["firstTimestamp"] == ev["lastTimestamp"] == "2023-11-14T22:13:20Z"
    clock.now += 65
    await recorder.warning(svc, "FailedToUpdateEndpointSlices", "boom")
    await recorder.warning(svc, "FailedToUpdateEndpointSlices", "boom")
    (ev,) = _events(registry)
    assert ev["count"] == 3 and ev["lastTimestamp"] == "2023-11-14T22:14:25Z"
    assert ev["firstTimestamp"] == "2023-11-14T22:13:20Z"
    # Gone (deleted, or expired): the next one is written anew.
    await registry.delete(EVENTS, "default", ev["metadata"]["name"])
    clock.now += 1
    await recorder.warning(svc, "FailedToUpdateEndpointSlices", "boom")
    (again,) = _events(registry)
    assert again["metadata"]["name"] != ev["metadata"]["name"]


async def test_similar_events_are_combined(registry: Registry, clock: SteppedClock) -> None:
    svc = await _service(registry)
    recorder = EventRecorder(registry, component="c", clock=clock)
    for i in range(12):
        clock.now += 1
        await recorder.normal(svc, "Sync", f"attempt {i}")
    events = sorted(_events(registry), key=lambda e: e["firstTimestamp"])
    assert [e["message"] for e in events[:9]] == [f"attempt {i}" for i in range(9)]
    (combined,) = events[9:]
    assert combined["message"] == "(combined from similar events): attempt 11"
    assert combined["count"] == 3


async def test_a_flood_is_cut_by_the_spam_filter(registry: Registry,
                                                  clock: SteppedClock) -> None:
    svc = await _service(registry)
    recorder = EventRecorder(registry, component="c", clock=clock)
    for i in range(30):
        clock.now += 0.001
        await recorder.normal(svc, f"Reason{i}", "m")
    assert len(_events(registry)) == 25
    clock.now += 300
    await recorder.normal(svc, "Late", "m")
    await recorder.normal(svc, "Later", "m")
    assert {e["reason"] for e in _events(registry)} >= {"Late"}
    assert len(_events(registry)) == 26


async def test_cluster_scoped_objects_get_events_in_default(registry: Registry,
                                                            clock: SteppedClock) -> None:
    await _service(registry)
    ns = registry.get(TYPES[("", "namespaces")], "", "default")
    await EventRecorder(registry, component="c", clock=clock).normal(ns, "Seen", "hello")
    (ev,) = _events(registry)
    assert ev["involvedObject"]["kind"] == "Namespace" and "namespace" not in ev[
        "involvedObject"]

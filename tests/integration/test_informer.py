"""The informer keeps a current copy of a kind through list + watch, across a
410 Gone and across an API server restart, and tells its handler each change."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from kubernetes import client

from mesh.informer import ADDED, DELETED, MODIFIED, Informer
from tests.cluster import Cluster, start_cluster, wait_for
from tests.meshproxy import free_port


def _configmap(name: str, value: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"v": value})


def test_lists_watches_and_reports_each_change(fresh_cluster: Cluster) -> None:
    core = client.CoreV1Api(fresh_cluster.api())
    core.create_namespaced_config_map("default", _configmap("before", "1"))
    seen: list[tuple[str, str]] = []
    inf = Informer(core.list_config_map_for_all_namespaces, kind="configmaps",
                   handler=lambda kind, obj: seen.append((kind, obj["metadata"]["name"])))
    inf.start()
    try:
        wait_for(lambda: inf.synced)
        assert (ADDED, "before") in seen
        core.create_namespaced_config_map("default", _configmap("after", "1"))
        core.patch_namespaced_config_map("after", "default", {"data": {"v": "2"}})
        core.delete_namespaced_config_map("before", "default")
        wait_for(lambda: (DELETED, "before") in seen)
        assert (ADDED, "after") in seen and (MODIFIED, "after") in seen
        assert inf.cache["default/after"]["data"] == {"v": "2"}
        assert "default/before" not in inf.cache
    finally:
        inf.stop()


def test_relists_after_gone_and_reports_what_it_missed(tmp_path: Path) -> None:
    # A history of 50 events. While the informer cannot reach the server (it runs on
    # another port meanwhile), 80 writes push its resourceVersion out of the history,
    # so when the server is back where the informer looks, the resumed watch gets 410
    # and the informer lists again.
    c = start_cluster(tmp_path / "state", "--watch-history", "50")
    port = int(c.server.rsplit(":", 1)[1])
    try:
        core = client.CoreV1Api(c.api())
        core.create_namespaced_config_map("default", _configmap("doomed", "1"))
        seen: list[tuple[str, str]] = []
        inf = Informer(functools.partial(core.list_namespaced_config_map, "default"),
                       kind="configmaps", max_backoff=0.2,
                       handler=lambda kind, obj: seen.append((kind, obj["metadata"]["name"])))
        inf.start()
        try:
            wait_for(lambda: inf.synced)
            c.kill()
            away = start_cluster(tmp_path / "state", "--watch-history", "50", "--listen",
                                 f"127.0.0.1:{free_port()}")
            try:
                elsewhere = client.CoreV1Api(away.api())
                elsewhere.delete_namespaced_config_map("doomed", "default")
                for i in range(80):
                    elsewhere.create_namespaced_config_map("default", _configmap(f"cm-{i}", "x"))
            finally:
                away.stop()
            back = start_cluster(tmp_path / "state", "--watch-history", "50", "--listen",
                                 f"127.0.0.1:{port}")
            try:
                wait_for(lambda: "default/cm-79" in inf.cache, timeout=20)
                assert (DELETED, "doomed") in seen
                assert inf.relists >= 1
                assert inf.errors >= 1
                assert sum(1 for k in inf.cache if k.startswith("default/cm-")) == 80
            finally:
                back.stop()
        finally:
            inf.stop()
    finally:
        c.stop()


def test_handlers_run_on_the_event_loop(fresh_cluster: Cluster) -> None:
    core = client.CoreV1Api(fresh_cluster.api())

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        on_loop: list[bool] = []

        def handler(kind: str, obj: dict[str, object]) -> None:
            on_loop.append(asyncio.get_running_loop() is loop)

        inf = Informer(core.list_namespace, kind="namespaces", handler=handler)
        inf.start(loop)
        try:
            assert await inf.wait_synced(10)
        finally:
            await loop.run_in_executor(None, inf.stop)
        return on_loop

    results = asyncio.run(main())
    assert results and all(results)


def test_a_missing_crd_is_retried_without_stopping(fresh_cluster: Cluster) -> None:
    custom = client.CustomObjectsApi(fresh_cluster.api())
    inf = Informer(functools.partial(custom.list_cluster_custom_object, "example.meshgate.io",
                                     "v1", "widgets"), kind="widgets", max_backoff=0.1)
    inf.start()
    try:
        wait_for(lambda: inf.errors >= 2)
        assert not inf.synced
    finally:
        inf.stop()

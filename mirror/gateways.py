"""`meshgate multicluster gateways`: one line per Link of the importing cluster,
from what its mirror controller wrote in the Link's status: whether the linked
cluster's gateway is alive (the GatewayAlive condition, with its hysteresis;
Unknown when no controller holds the Link's Lease),
the latency percentiles of its latest successful probes (``gatewayLatency``)
and how many Services are mirrored; then, per linked cluster, the Services that
fail over to it (``failover through west: shop/web``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mesh.discovery import failover
from mirror.errors import MirrorError
from mirror.importing import LINK_CRD, ImportingCluster, Obj, quiet_retries

HEADER = ("CLUSTER", "ALIVE", "P50", "P95", "P99", "MIRRORED")


def condition(link: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The Link's condition of that type, or {} when it has none."""
    for c in (link.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return {}


def cluster_name(link: Mapping[str, Any]) -> str:
    return str((link.get("spec") or {}).get("targetClusterName")
               or link["metadata"]["name"])


def _ms(value: Any) -> str:
    return f"{float(value):.1f}ms" if isinstance(value, int | float) else "-"


def gateway_row(link: Obj, *, served: bool = True) -> tuple[str, ...]:
    """The Link's line; its gateway's liveness is Unknown when no controller serves
    the Link, since what its status says may be long out of date."""
    status = link.get("status") or {}
    latency = status.get("gatewayLatency") or {}
    alive = str(condition(link, "GatewayAlive").get("status") or "Unknown") if served \
        else "Unknown"
    count = status.get("mirroredServiceCount")
    return (cluster_name(link), alive, _ms(latency.get("p50")), _ms(latency.get("p95")),
            _ms(latency.get("p99")), str(count) if isinstance(count, int) else "-")


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def failover_lines(services: Sequence[Obj], clusters: Iterable[str]) -> list[str]:
    """For `multicluster gateways`: per linked cluster, the Services that fail over to it."""
    mirrors = failover.mirror_index(services)
    through: dict[str, list[str]] = {}
    for svc in failover.failover_services(services):
        key = failover.object_key(svc)

        def mirror_of(cluster: str, key: failover.ObjKey = key) -> failover.ObjKey | None:
            return mirrors.get((key, cluster))

        plan, _ = failover.plan(svc, local_cluster="", mirror_of=mirror_of)
        for group in plan.groups if plan is not None else ():
            if not group.local:
                through.setdefault(group.cluster, []).append("/".join(key))
    return [f"failover through {c}: {', '.join(through[c])}" for c in clusters
            if c in through]


def run_gateways(args: argparse.Namespace) -> int:
    quiet_retries()
    cluster = ImportingCluster(args.kubeconfig, args.namespace)
    try:
        if cluster.link_crd() is None:
            raise MirrorError(f"the importing cluster at {cluster.server} has no Links: the "
                              f"CustomResourceDefinition {LINK_CRD} is not installed")
        links = cluster.links()
        rows = [gateway_row(link, served=not cluster.serving(link["metadata"]["name"]).problem)
                for link in links]
        through = failover_lines(cluster.services(), [row[0] for row in rows]) if links else []
    finally:
        cluster.close()
    if not links:
        print(f"no Links in namespace {args.namespace}")
        return 0
    for line in table([HEADER, *rows]):
        print(line)
    for line in through:
        print(line)
    return 0

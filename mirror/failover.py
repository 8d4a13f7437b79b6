"""`meshgate failover status`: for each Service annotated
``failover.meshgate.io/clusters``, its priority groups in order, each group's
endpoints and health, the clusters skipped and why, and which group serves.

The groups are what the control plane computes (`mesh.discovery.failover`), read
from the importing cluster's Services, EndpointSlices and Links. A group is
healthy when it has a ready endpoint and, for a linked cluster, when a mirror
controller serves its Link and the Link's GatewayAlive condition holds. The
serving group is the first healthy one: the control plane's view, since each
proxy also detects failures itself and may have moved on. Exit status 1 when
some annotated Service has no healthy group.

`missing_mirrors` is what `multicluster check` says of a linked cluster listed
by a Service that has no mirror of it there.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kubernetes import config as kube_config

from mesh.discovery import failover
from mesh.discovery.failover import (
    CLUSTERS_ANNOTATION,
    FailoverPlan,
    Obj,
    ObjKey,
    Problem,
    failover_services,
    mirror_index,
    object_key,
)
from mesh.errors import ConfigError
from mirror.gateways import cluster_name, condition
from mirror.importing import ImportingCluster, quiet_retries
from mirror.mirrors import MANAGED_BY, MANAGED_BY_LABEL


@dataclass(frozen=True)
class GroupHealth:
    """One priority group as `failover status` shows it."""

    cluster: str
    local: bool
    endpoints: int
    ready: int
    problem: str
    """Why the group is not healthy; '' when it is."""
    note: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class ServiceFailover:
    """A failover Service: its groups in order and what was left out."""

    key: ObjKey
    value: str
    """The clusters annotation as written."""
    plan: FailoverPlan | None
    """None: the annotation cannot be used and the Service is served plain."""
    problems: tuple[Problem, ...]
    groups: tuple[GroupHealth, ...] = ()

    @property
    def serving(self) -> int | None:
        """The place of the first healthy group, None when none is."""
        return next((i for i, g in enumerate(self.groups) if g.healthy), None)


def plan_of(svc: Obj, mirrors: Mapping[tuple[ObjKey, str], ObjKey], *, local_cluster: str
            ) -> ServiceFailover:
    key = object_key(svc)
    value = str(((svc.get("metadata") or {}).get("annotations") or {}).get(
        CLUSTERS_ANNOTATION) or "")
    plan, problems = failover.plan(svc, local_cluster=local_cluster,
                                   mirror_of=lambda c: mirrors.get((key, c)))
    return ServiceFailover(key, value, plan, tuple(problems))


def count(slices: Iterable[Obj]) -> tuple[int, int]:
    """(endpoints, ready endpoints) of slices; an absent ready condition is ready."""
    eps = [ep for s in slices for ep in s.get("endpoints") or [] if ep.get("addresses")]
    return len(eps), sum((ep.get("conditions") or {}).get("ready") is not False for ep in eps)


def _managed(piece: Obj) -> bool:
    labels = (piece.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def local_health(cluster: str, slices: Sequence[Obj]) -> GroupHealth:
    total, ready = count(s for s in slices if not _managed(s))
    return GroupHealth(cluster, True, total, ready, "" if ready else "no ready endpoint")


def linked_health(cluster: str, slices: Sequence[Obj], link: Obj | None, *,
                  served: str) -> GroupHealth:
    """A linked cluster's group: its mirror's gateway endpoints and its Link's
    GatewayAlive condition. `served` is why no controller serves the Link ('' if one does)."""
    total, ready = count(s for s in slices if _managed(s))
    if link is None:
        return GroupHealth(cluster, False, total, ready, f"no Link names cluster {cluster}")
    where = f"{link['metadata'].get('namespace')}/{link['metadata']['name']}"
    alive = condition(link, "GatewayAlive")
    if served:
        problem = f"no mirror controller serves Link {where}: {served}"
    elif alive.get("status") != "True":
        problem = (f"its gateway is not alive (Link {where}: "
                   f"{alive.get('message') or alive.get('reason') or 'not probed yet'})")
    elif not ready:
        problem = "no ready gateway endpoint"
    else:
        problem = ""
    return GroupHealth(cluster, False, total, ready, problem,
                       note="" if problem else "gateway alive")


def report(status: ServiceFailover, *, failback: str = "") -> list[str]:
    """The lines `failover status` prints for one Service."""
    ns, name = status.key
    head = f"{ns}/{name}  clusters: {status.value}"
    if status.plan is None:
        return [head] + [f"  {p.event}: {p.cause}" for p in status.problems]
    lines = [head + (f"  failback: {failback}" if failback else "")]
    rows = [("GROUP", "CLUSTER", "ENDPOINTS", "READY", "HEALTH")]
    for i, g in enumerate(status.groups):
        health = "healthy" if g.healthy else f"unhealthy: {g.problem}"
        note = "local" if g.local else g.note
        rows.append((str(i), g.cluster or "(local)", str(g.endpoints), str(g.ready),
                     health + (f" ({note})" if g.healthy and note else "")))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True))
              + "  " + r[4] for r in rows]
    for p in status.problems:
        if p in status.plan.skipped:
            lines.append(f"  skipped {p.cluster}: {p.cause}")
        else:
            lines.append(f"  {p.event}{f' {p.cluster}' if p.cluster else ''}: {p.cause}")
    serving = status.serving
    if serving is None:
        lines.append("  serving: none: no group is healthy (the control plane's view)")
    else:
        g = status.groups[serving]
        lines.append(f"  serving: group {serving} ({g.cluster or 'local'}"
                     f"{', local' if g.local and g.cluster else ''}), the first healthy "
                     "group in the control plane's view; each proxy also detects failures "
                     "itself")
    return lines


def missing_mirrors(services: Sequence[Obj], cluster: str) -> list[tuple[str, str]]:
    """For `multicluster check`: (Service name, cause) of each failover Service that
    lists `cluster`, a linked cluster, but has no mirror from it."""
    mirrors = mirror_index(services)
    found = []
    for svc in failover_services(services):
        key = object_key(svc)
        try:
            listed, _ = failover.parse_clusters(
                svc["metadata"]["annotations"][CLUSTERS_ANNOTATION])
        except failover.FailoverError:
            continue  # `failover status` names it; the control plane serves it plain
        if cluster in listed and (key, cluster) not in mirrors:
            found.append((key[1], f"cluster {cluster} has no mirror of {key[0]}/{key[1]} "
                                  "(is it exported there?)"))
    return found


def context_cluster(kubeconfig: str) -> str:
    """The cluster name of the kubeconfig's current context (an embedded cluster's name)."""
    try:
        _, active = kube_config.list_kube_config_contexts(config_file=kubeconfig)
    except (kube_config.ConfigException, OSError) as e:
        raise ConfigError(f"cannot read kubeconfig {kubeconfig}: {e}; pass --cluster-name "
                          "or a usable --kubeconfig") from e
    return str((active.get("context") or {}).get("cluster") or active.get("name") or "")


def run_status(args: argparse.Namespace) -> int:
    quiet_retries()
    local = args.cluster_name or context_cluster(str(args.kubeconfig))
    cluster = ImportingCluster(args.kubeconfig, "meshgate")
    try:
        services = cluster.services()
        chosen = failover_services(services)
        if args.service:
            ns, _, name = args.service.partition("/")
            if not any(object_key(s) == (ns, name) for s in services):
                raise ConfigError(f"Service {args.service} does not exist in the cluster at "
                                  f"{cluster.server}")
            chosen = [s for s in chosen if object_key(s) == (ns, name)]
            if not chosen:
                print(f"{args.service} has no {CLUSTERS_ANNOTATION} annotation: it is served "
                      "without failover")
                return 0
        if not chosen:
            print(f"no Service has a {CLUSTERS_ANNOTATION} annotation")
            return 0
        links = {cluster_name(link): link for link in cluster.all_links()}
        mirrors = mirror_index(services)
        print(f"local cluster: {local or '(unnamed)'}")
        unhealthy = 0
        for svc in chosen:
            status = _with_health(cluster, plan_of(svc, mirrors, local_cluster=local), links)
            policy = status.plan.policy if status.plan else None
            failback = f"{policy.failback_s:g}s" if policy and policy.failback_s else ""
            for line in report(status, failback=failback):
                print(line)
            unhealthy += status.plan is not None and status.serving is None
    finally:
        cluster.close()
    if unhealthy:
        print(f"{unhealthy} failover Service{'s' if unhealthy != 1 else ''} "
              "with no healthy group")
    return 1 if unhealthy else 0


def _with_health(cluster: ImportingCluster, status: ServiceFailover, links: Mapping[str, Obj]
                 ) -> ServiceFailover:
    if status.plan is None:
        return status
    groups = []
    for group in status.plan.groups:
        ns, name = status.key if group.mirror is None else group.mirror
        slices = cluster.slices_of(ns, name)
        if group.mirror is None:
            groups.append(local_health(group.cluster, slices))
            continue
        link = links.get(group.cluster)
        served = "" if link is None else cluster.serving(
            str(link["metadata"]["name"]), namespace=str(link["metadata"]["namespace"])).problem
        groups.append(linked_health(group.cluster, slices, link, served=served))
    return ServiceFailover(status.key, status.value, status.plan, status.problems,
                           tuple(groups))

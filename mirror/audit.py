"""What `meshgate multicluster check` finds wrong with mirror Services, from the
importing cluster's Services and mirror EndpointSlices and the linked
cluster's Services: mirrors without endpoints, orphaned mirrors (their remote
Service is gone, no longer selected, or mapped elsewhere; or no Link names
their cluster) and name collisions. Pure logic, no I/O.

Each finding is a ``(where, why)`` pair or a sentence naming both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mirror.importing import ImportingCluster, Obj
from mirror.link import LinkSpec
from mirror.mirrors import (
    CLUSTER_LABEL,
    MIRRORED_LABEL,
    REMOTE_DISCOVERY_LABEL,
    SERVICE_NAME_LABEL,
    RemoteKey,
    is_mirror,
    owned,
    placement,
    remote_key,
)

Finding = tuple[str, str]


def _where(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _labels(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


@dataclass
class LocalView:
    """The importing cluster's Services (by namespace/name) and mirror slices."""

    services: dict[str, Obj] = field(default_factory=dict)
    slices: list[Obj] = field(default_factory=list)

    @classmethod
    def read(cls, cluster: ImportingCluster) -> LocalView:
        return cls.of(cluster.services(), cluster.mirror_slices())

    @classmethod
    def of(cls, services: Iterable[Obj], slices: Iterable[Obj]) -> LocalView:
        return cls({_where(s): s for s in services}, list(slices))

    def mirrors_of(self, cluster: str) -> list[Obj]:
        return [s for _, s in sorted(self.services.items()) if owned(s, cluster)]


def missing_endpoints(local: LocalView, cluster: str) -> list[Finding]:
    """Mirrors of `cluster` whose EndpointSlices hold no address. Mirrors whose
    endpoints are discovered in the remote cluster have no slice by design."""
    found = []
    for svc in local.mirrors_of(cluster):
        if REMOTE_DISCOVERY_LABEL in _labels(svc):
            continue
        meta = svc["metadata"]
        mine = [s for s in local.slices if s["metadata"].get("namespace") == meta["namespace"]
                and _labels(s).get(SERVICE_NAME_LABEL) == meta["name"] and owned(s, cluster)]
        addresses = sum(len(ep.get("addresses") or []) for s in mine
                        for ep in s.get("endpoints") or [])
        if not mine:
            found.append((_where(svc), "it has no EndpointSlice"))
        elif not addresses:
            found.append((_where(svc), "its EndpointSlice holds no endpoint"))
    return found


def selected(remote: Sequence[Obj], spec: LinkSpec) -> dict[RemoteKey, Obj]:
    """The remote Services the Link mirrors (mirrors there are never mirrored again)."""
    out = {}
    for obj in remote:
        if is_mirror(obj):
            continue
        labels = _labels(obj)
        discovery = spec.remote_discovery_selector
        if spec.selector.matches(labels) or (discovery is not None
                                             and discovery.matches(labels)):
            meta = obj["metadata"]
            out[RemoteKey(str(meta["namespace"]), str(meta["name"]))] = obj
    return out


def orphans(local: LocalView, remote: Sequence[Obj], spec: LinkSpec) -> list[Finding]:
    """Mirrors of the Link's cluster that no selected remote Service places where
    they are."""
    cluster = spec.target_cluster_name
    chosen = selected(remote, spec)
    existing = {RemoteKey(str(o["metadata"]["namespace"]), str(o["metadata"]["name"]))
                for o in remote if not is_mirror(o)}
    found = []
    for svc in local.mirrors_of(cluster):
        here = _where(svc)
        key = remote_key(svc)
        if key is None:
            found.append((here, "it names no remote Service (its fully-qualified-name "
                                "annotation is missing)"))
        elif key not in existing:
            found.append((here, f"remote Service {key} no longer exists in {cluster}"))
        elif key not in chosen:
            found.append((here, f"remote Service {key} is no longer exported (the Link's "
                                "selector does not pick it)"))
        elif str(placement(key, spec)) != here:
            found.append((here, f"remote Service {key} is now mirrored to "
                                f"{placement(key, spec)}"))
    return found


def collisions(local: LocalView, remote: Sequence[Obj], spec: LinkSpec) -> list[str]:
    """Places two selected remote Services share, and places where a Service that
    is not the right mirror sits."""
    cluster = spec.target_cluster_name
    places: dict[str, list[RemoteKey]] = {}
    for key in sorted(selected(remote, spec)):
        places.setdefault(str(placement(key, spec)), []).append(key)
    found = []
    for where, keys in sorted(places.items()):
        if len(keys) > 1:
            found.append(f"remote Services {' and '.join(map(str, keys))} of {cluster} would "
                         f"both be mirrored to {where}")
            continue
        current = local.services.get(where)
        if current is None or (owned(current, cluster) and remote_key(current) == keys[0]):
            continue
        if not is_mirror(current):
            what = "a Service that is not a mirror"
        elif not owned(current, cluster):
            what = f"a mirror of cluster {_labels(current).get(CLUSTER_LABEL)}"
        else:
            what = f"the mirror of {remote_key(current)}"
        found.append(f"Service {where} is {what}, so remote Service {keys[0]} of {cluster} "
                     "is not mirrored")
    return found


def unlinked(local: LocalView, clusters: set[str]) -> list[Finding]:
    """Mirror Services whose cluster no Link names: (where, cluster)."""
    return [(where, _labels(s).get(CLUSTER_LABEL) or "<none>")
            for where, s in sorted(local.services.items())
            if _labels(s).get(MIRRORED_LABEL) == "true"
            and _labels(s).get(CLUSTER_LABEL) not in clusters]

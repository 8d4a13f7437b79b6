"""Failover priority groups: the order in which a Service's endpoints take traffic,
from its annotations. Pure logic, no I/O; the destination index applies it, and
`meshgate failover status` and `multicluster check` read the same answers.

A Service opts in with ``failover.meshgate.io/clusters: "west,central"``: its
endpoints form priority groups, group 0 the local endpoints (the Service's own
slices), then one group per listed linked cluster in the declared order, holding
the gateway endpoints of that cluster's mirror of this same Service. Local comes
first unless the list names the local cluster itself, which then puts the local
endpoints at that place. A listed cluster with no mirror of the Service is
skipped with a warning and the rest of the order kept; a cluster listed twice
keeps its first place; an empty or garbled annotation leaves the Service plain.

A mirror of the Service ``<svc>`` in namespace ``<ns>`` is found by what the
mirror controller writes on it, never by its name (long names are hashed): a
Service of the same namespace labelled ``mirror.meshgate.io/mirrored-service=true``
and ``mirror.meshgate.io/cluster-name=<cluster>``, whose
``mirror.meshgate.io/remote-svc-fq-name`` annotation is ``<svc>.<ns>.svc.<domain>``.

``failover.meshgate.io/policy`` tunes the proxy: ``failback=10s`` is how long a
preferred group must stay healthy before traffic returns to it (units ``ms``,
``s``, ``m``; at most an hour). Items are comma separated ``key=value`` pairs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from mesh.errors import ConfigError
from mesh.proxy.discovery import EndpointSpec

CLUSTERS_ANNOTATION = "failover.meshgate.io/clusters"
POLICY_ANNOTATION = "failover.meshgate.io/policy"
# What the mirror controller (mirror/mirrors.py) writes on a mirror Service.
MIRRORED_LABEL = "mirror.meshgate.io/mirrored-service"
CLUSTER_LABEL = "mirror.meshgate.io/cluster-name"
REMOTE_NAME_ANNOTATION = "mirror.meshgate.io/remote-svc-fq-name"

MAX_FAILBACK_S = 3600.0
_CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}

Obj = Mapping[str, Any]
ObjKey = tuple[str, str]
"""(namespace, name)"""


class FailoverError(ConfigError):
    """A failover annotation cannot be used; the message says what is wrong in it."""


@dataclass(frozen=True)
class FailoverPolicy:
    """What `failover.meshgate.io/policy` tells the proxy."""

    failback_s: float | None = None
    """Seconds a preferred group must stay healthy before traffic returns to it;
    None: the proxy's default."""


@dataclass(frozen=True)
class MirrorRef:
    """What a mirror Service stands for: a Service of a linked cluster."""

    cluster: str
    namespace: str
    name: str


@dataclass(frozen=True)
class PriorityGroup:
    """One group of a failover order: the local endpoints (`mirror` None) or a linked
    cluster's, reached through the mirror Service `mirror`."""

    cluster: str
    mirror: ObjKey | None

    @property
    def local(self) -> bool:
        return self.mirror is None


@dataclass(frozen=True)
class Problem:
    """Something in a Service's failover annotations that was not used as written."""

    event: str
    """What was done about it, e.g. ``failover cluster skipped``."""
    cause: str
    cluster: str = ""

    def line(self, service: ObjKey) -> str:
        """The key=value log line naming the Service."""
        where = f" cluster={self.cluster}" if self.cluster else ""
        return f"{self.event} service={service[0]}/{service[1]}{where} cause={self.cause}"


@dataclass(frozen=True)
class FailoverPlan:
    """A Service's priority groups in order, and what its annotations asked for that
    could not be had."""

    groups: tuple[PriorityGroup, ...]
    skipped: tuple[Problem, ...]
    """Listed clusters left out (no mirror of the Service there)."""
    policy: FailoverPolicy


def parse_clusters(value: Any) -> tuple[list[str], list[str]]:
    """The clusters `failover.meshgate.io/clusters` lists, in order and once each, and
    those listed again. Raises FailoverError when it is empty or not a comma separated
    list of cluster names."""
    text = str(value if value is not None else "").strip()
    if not text:
        raise FailoverError(f"{CLUSTERS_ANNOTATION} is empty; list linked clusters in the "
                            "order to fail over to, such as \"west,central\"")
    order: list[str] = []
    again: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not _CLUSTER_NAME.match(item):
            raise FailoverError(f"{CLUSTERS_ANNOTATION}={text!r}: {item!r} is not a cluster "
                                "name (a lowercase DNS label); list linked clusters comma "
                                "separated, such as \"west,central\"")
        (again if item in order else order).append(item)
    return order, again


def parse_policy(value: Any) -> FailoverPolicy:
    """`failover.meshgate.io/policy` as a FailoverPolicy; raises FailoverError naming
    the item it cannot use."""
    text = str(value if value is not None else "").strip()
    failback: float | None = None
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise FailoverError(f"{POLICY_ANNOTATION}: {item!r} is not key=value, such as "
                                "failback=10s")
        if key != "failback":
            raise FailoverError(f"{POLICY_ANNOTATION}: unknown key {key!r}; the one key is "
                                "failback, such as failback=10s")
        if failback is not None:
            raise FailoverError(f"{POLICY_ANNOTATION}: failback is given twice")
        failback = _duration(raw)
    return FailoverPolicy(failback_s=failback)


def _duration(raw: str) -> float:
    match = _DURATION.match(raw)
    if match is None:
        raise FailoverError(f"{POLICY_ANNOTATION}: failback={raw!r} is not a duration such "
                            "as 10s, 500ms or 2m")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_FAILBACK_S or not math.isfinite(seconds):
        raise FailoverError(f"{POLICY_ANNOTATION}: failback={raw!r} must be above zero and "
                            f"at most {MAX_FAILBACK_S / 60:g}m")
    return seconds


def mirror_ref(service: Obj) -> MirrorRef | None:
    """The remote Service a mirror Service stands for; None for any other Service."""
    meta = service.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MIRRORED_LABEL) != "true" or not labels.get(CLUSTER_LABEL):
        return None
    fq_name = str((meta.get("annotations") or {}).get(REMOTE_NAME_ANNOTATION) or "")
    parts = fq_name.split(".")
    if len(parts) < 3 or not parts[0] or not parts[1] or parts[2] != "svc":
        return None
    return MirrorRef(str(labels[CLUSTER_LABEL]), parts[1], parts[0])


def is_mirror(service: Obj) -> bool:
    labels = (service.get("metadata") or {}).get("labels") or {}
    return labels.get(MIRRORED_LABEL) == "true"


def opted_in(service: Obj) -> bool:
    """Whether a Service asks for failover (mirrors never do: their annotations are the
    remote Service's, which speak of the remote cluster)."""
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    return CLUSTERS_ANNOTATION in annotations and not is_mirror(service)


def plan(service: Obj, *, local_cluster: str,
         mirror_of: Callable[[str], ObjKey | None]) -> tuple[FailoverPlan | None, list[Problem]]:
    """The Service's priority groups, or None when it is served plain (no annotation,
    or one that cannot be used), with the problems found on the way. `mirror_of(cluster)`
    is the mirror of this Service from that linked cluster, if there is one."""
    if not opted_in(service):
        return None, []
    meta = service.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    name = str(meta.get("name"))
    try:
        order, again = parse_clusters(annotations.get(CLUSTERS_ANNOTATION))
    except FailoverError as e:
        return None, [Problem("failover annotation ignored", f"{e}; served without failover")]
    problems = [Problem("failover cluster listed twice", f"{CLUSTERS_ANNOTATION} lists it "
                        "more than once; its first place is kept", cluster)
                for cluster in dict.fromkeys(again)]
    try:
        policy = parse_policy(annotations.get(POLICY_ANNOTATION))
    except FailoverError as e:
        policy = FailoverPolicy()
        problems.append(Problem("failover policy ignored", f"{e}; the proxy's default "
                                "failback is used"))
    if local_cluster not in order:
        order.insert(0, local_cluster)
    groups: list[PriorityGroup] = []
    skipped: list[Problem] = []
    for cluster in order:
        if cluster == local_cluster:
            groups.append(PriorityGroup(cluster, None))
            continue
        mirror = mirror_of(cluster)
        if mirror is None:
            skipped.append(Problem("failover cluster skipped",
                                   f"no mirror of {name} from cluster {cluster}", cluster))
        else:
            groups.append(PriorityGroup(cluster, mirror))
    return FailoverPlan(tuple(groups), tuple(skipped), policy), problems + skipped


def ranked(groups: Iterable[Sequence[EndpointSpec]]) -> list[EndpointSpec]:
    """The endpoints of each group in turn, with the group's place as their priority.
    An address already in a preferred group is not listed again."""
    out: dict[tuple[str, int], EndpointSpec] = {}
    for priority, endpoints in enumerate(groups):
        for ep in endpoints:
            key = (ep.address, ep.target_port)
            if key not in out:
                out[key] = ep if ep.priority == priority else msgspec.structs.replace(
                    ep, priority=priority)
    return list(out.values())


def object_key(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name"))


def mirror_index(services: Iterable[Obj]) -> dict[tuple[ObjKey, str], ObjKey]:
    """(local Service, cluster) -> its mirror from that cluster, as the control plane
    finds it: in the Service's namespace, by labels and remote name annotation."""
    found: dict[tuple[ObjKey, str], list[ObjKey]] = {}
    for svc in services:
        ref = mirror_ref(svc)
        key = object_key(svc)
        if ref is not None and ref.namespace == key[0]:
            found.setdefault(((key[0], ref.name), ref.cluster), []).append(key)
    return {where: sorted(keys)[0] for where, keys in found.items()}


def failover_services(services: Iterable[Obj]) -> list[Obj]:
    """The Services that opt in to failover, by namespace and name."""
    return sorted((s for s in services if opted_in(s)), key=object_key)

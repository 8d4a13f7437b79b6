"""The cluster DNS zone filled from Services and EndpointSlices, without sockets.

`ClusterZone` is a mesh.dns.Zone that follows Service and EndpointSlice events:
A/AAAA for a ClusterIP (the ready endpoint addresses for a headless Service),
SRV for named ports, CNAME for ExternalName. Queries go through mesh.dns.respond;
localcluster.dns serves it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdata

from mesh.dns import CNAME, IN, SRV, TTL, Rdatas, Zone, address_rdatas
from mesh.informer import DELETED, Obj, key_of

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")

ServiceKey = tuple[str, str]


# -- the zone ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    service: ServiceKey
    ready: tuple[str, ...]
    every: tuple[str, ...]


class ClusterZone(Zone):
    """The names of one cluster domain, kept from Service and EndpointSlice events."""

    def __init__(self, domain: str = "cluster.local", *, ttl: int = TTL) -> None:
        super().__init__(domain, ttl=ttl)
        self._services: dict[ServiceKey, Obj] = {}
        self._slices: dict[ServiceKey, dict[str, _Slice]] = {}
        self._slice_owner: dict[str, ServiceKey] = {}
        self._owned: dict[ServiceKey, list[dns.name.Name]] = {}

    # -- events (informer handlers) -------------------------------------------------

    def on_service(self, event: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if event == DELETED:
            self._services.pop(key, None)
        else:
            self._services[key] = obj
        self._reindex(key)

    def on_endpoint_slice(self, event: str, obj: Obj) -> None:
        slice_key = key_of(obj)
        touched = set()
        old = self._slice_owner.pop(slice_key, None)
        if old is not None:
            self._slices[old].pop(slice_key, None)
            if not self._slices[old]:
                del self._slices[old]
            touched.add(old)
        parsed = None if event == DELETED else _parse_slice(obj)
        if parsed is not None:
            self._slices.setdefault(parsed.service, {})[slice_key] = parsed
            self._slice_owner[slice_key] = parsed.service
            touched.add(parsed.service)
        for key in touched:
            self._reindex(key)

    # -- the index ------------------------------------------------------------------

    def _reindex(self, key: ServiceKey) -> None:
        for name in self._owned.pop(key, ()):
            self.discard(name)
        svc = self._services.get(key)
        owned = []
        for name, rdatas in (self._records(key, svc) if svc is not None else {}).items():
            if not self.add(name, rdatas):  # only with names the API should have refused
                log.warning("dns: name=%s claimed twice; keeping the first", name)
                continue
            owned.append(name)
        if owned:
            self._owned[key] = owned

    def _records(self, key: ServiceKey, svc: Obj) -> dict[dns.name.Name, Rdatas]:
        ns, name = key
        if not (_LABEL.fullmatch(ns) and _LABEL.fullmatch(name)):
            return {}
        owner = dns.name.from_text(f"{name}.{ns}", self.svc)
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            try:
                target = dns.name.from_text(str(spec.get("externalName") or ""))
            except dns.exception.DNSException:
                return {owner: {}}
            if target == dns.name.root:
                return {owner: {}}
            return {owner: {CNAME: (dns.rdata.from_text(IN, CNAME, target.to_text()),)}}
        if spec.get("clusterIP") == "None":
            addresses = self._endpoint_addresses(key, bool(spec.get("publishNotReadyAddresses")))
        else:
            addresses = list(spec.get("clusterIPs") or [spec.get("clusterIP")])
        nodes: dict[dns.name.Name, Rdatas] = {owner: address_rdatas(addresses)}
        for port in spec.get("ports") or []:
            port_name, number = port.get("name"), port.get("port")
            proto = str(port.get("protocol") or "TCP").lower()
            if not (isinstance(port_name, str) and _LABEL.fullmatch(f"_{port_name}")
                    and _LABEL.fullmatch(f"_{proto}") and isinstance(number, int)
                    and 0 < number < 65536):
                continue
            srv = dns.rdata.from_text(IN, SRV, f"0 100 {number} {owner}")
            nodes[dns.name.from_text(f"_{port_name}._{proto}", owner)] = {SRV: (srv,)}
        return nodes

    def _endpoint_addresses(self, key: ServiceKey, not_ready_too: bool) -> list[str]:
        slices = self._slices.get(key, {})
        return [a for s in slices.values() for a in (s.every if not_ready_too else s.ready)]


def _parse_slice(obj: Obj) -> _Slice | None:
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    ready, every = [], []
    for endpoint in obj.get("endpoints") or []:
        addresses = [str(a) for a in endpoint.get("addresses") or []]
        every += addresses
        # As in Kubernetes: a missing `ready` condition means ready.
        if (endpoint.get("conditions") or {}).get("ready") is not False:
            ready += addresses
    return _Slice((str(meta.get("namespace") or ""), str(service)), tuple(ready), tuple(every))

"""The proxy's side of the destination API: `WatchDiscovery`, a `Discovery` kept
current by the control plane's stream of every service.

It resolves, lists and announces services exactly as `StaticDiscovery` does
(it is one, fed by the stream instead of a file): a fresh snapshot, at the
first connection or after a reconnection, is applied as a diff, so only
services that changed or went away are announced, and a service that went
away is announced once more without endpoints. While the control plane is
away the last known data keeps serving (`ControlStream`). Messages are
validated with the proxy's own models; an invalid one is logged (one line,
with the field path) and skipped, never fatal.

This module runs inside the proxy: it must not import the kubernetes client.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

import msgspec

from mesh.discovery.stream import ControlStream
from mesh.identity.names import Identity
from mesh.proxy.discovery import (
    DiscoveryFile,
    ServiceSpec,
    StaticDiscovery,
    canonical_address,
    split_host_port,
)
from mesh.structs import convert, explain

log = logging.getLogger(__name__)

PATH = "/v1/destinations"


class WatchDiscovery(ControlStream, StaticDiscovery):
    """Discovery from the control plane at ``url``: every service, kept current.

    See `ControlStream` for ``context`` and ``server_identity``; `ready` is set
    once a first snapshot has been applied.
    """

    what = "discovery stream"

    def __init__(self, url: str, *, context: Callable[[], ssl.SSLContext],
                 server_identity: Identity, **options: Any) -> None:
        StaticDiscovery.__init__(self, DiscoveryFile(services=[]))
        ControlStream.__init__(self, url, PATH, context=context,
                               server_identity=server_identity, **options)

    # -- messages (no I/O) -----------------------------------------------------------

    def receive_line(self, line: bytes) -> None:
        """Apply one message of the stream; a bad one is logged and skipped."""
        try:
            msg = json.loads(line)
        except ValueError as e:
            log.warning("discovery message skipped server=%s cause=not JSON: %s", self.url, e)
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "snapshot":
            self._snapshot(msg)
        elif kind == "update":
            svc = self._parse(msg.get("service"), "service")
            if svc is not None and self._put(svc):
                self._announce(svc)
        elif kind == "delete":
            self._delete(msg)
        elif kind != "heartbeat":
            log.debug("discovery message ignored server=%s type=%r", self.url, kind)

    def _snapshot(self, msg: dict[str, Any]) -> None:
        self.set_heartbeat(msg.get("heartbeatSeconds"))
        items = msg.get("services")
        if not isinstance(items, list):
            log.warning("discovery snapshot skipped server=%s field=services cause=not a list",
                        self.url)
            return
        try:  # all at once is several times faster than item by item
            services = convert(items, list[ServiceSpec])
        except msgspec.ValidationError:  # find, report and skip the bad ones
            services = [svc for i, item in enumerate(items)
                        if (svc := self._parse(item, f"services[{i}]")) is not None]
        changed = self._index(services)
        self.snapshot_applied()
        log.info("discovery snapshot applied server=%s services=%d changed=%d connection=%d",
                 self.url, len(self._by_address), len(changed), self.connections)
        for svc in changed:
            self._announce(svc)

    def _delete(self, msg: dict[str, Any]) -> None:
        address = msg.get("address")
        try:
            key = canonical_address(*split_host_port(str(address)))
        except ValueError as e:
            log.warning("discovery message skipped server=%s field=address cause=%s",
                        self.url, e)
            return
        old = self._by_address.get(key)
        if old is not None:
            self._unlink(key, old)
            self._announce(old.without_endpoints())

    def _parse(self, item: Any, where: str) -> ServiceSpec | None:
        try:
            return convert(item, ServiceSpec)
        except msgspec.ValidationError as e:
            name = item.get("name") if isinstance(item, dict) else None
            field, reason = explain(e, item, ServiceSpec)
            log.warning("discovery item skipped server=%s service=%s cause=%s: %s", self.url,
                        name, f"{where}.{field}" if field else where, reason)
            return None

    # -- the table, one service at a time --------------------------------------------
    # StaticDiscovery rebuilds its tables from a whole file; one update must not cost
    # a pass over every service, so updates and deletes touch only their own entries.

    def _put(self, svc: ServiceSpec) -> bool:
        key = canonical_address(*svc.host_port)
        old = self._by_address.get(key)
        if old == svc:
            return False
        if old is not None:
            self._unlink(key, old)
        self._by_address[key] = svc
        self._by_authority[(svc.name, key[1])] = svc
        self._by_name.setdefault(svc.name, []).append(svc)
        return True

    def _unlink(self, key: tuple[str, int], old: ServiceSpec) -> None:
        del self._by_address[key]
        if self._by_authority.get((old.name, key[1])) is old:
            del self._by_authority[(old.name, key[1])]
        same = [s for s in self._by_name.get(old.name, []) if s is not old]
        if same:
            self._by_name[old.name] = same
        else:
            self._by_name.pop(old.name, None)



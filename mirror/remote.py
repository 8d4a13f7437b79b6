"""The linked cluster as one credential watches it: an informer on the remote
Services each of the Link's selectors picks (the gateway selector, and the
remote-discovery one when set), and what the controller remembers of the
remote API's health. Mirrors are never mirrored again, so two clusters can be
linked both ways."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kubernetes import client

from mesh.informer import Handler, Informer, Obj
from mirror.credentials import RemoteCredentials
from mirror.mirrors import RemoteKey, is_mirror

MAX_BACKOFF = 5.0
"""The longest an informer waits before trying a remote API that went away again
(each try it makes logs a line)."""
WATCH_TIMEOUT = 60
"""Seconds a remote watch lasts; a dead connection is noticed within this plus 30 s."""


@dataclass
class RemoteCluster:
    creds: RemoteCredentials
    secret: str
    """The credentials Secret, as namespace/name."""
    selectors: tuple[str, str | None]
    """(selector, remoteDiscoverySelector) as label-selector queries."""
    handler: Handler
    informers: list[Informer] = field(default_factory=list, init=False)
    errors_seen: int = 0
    failures: int = 0
    """Consecutive failed checks of the remote API."""
    next_check: float = 0.0

    def __post_init__(self) -> None:
        api = client.CoreV1Api(self.creds.client)
        self.informers = [
            Informer(api.list_service_for_all_namespaces, kind="remote-services",
                     label_selector=selector or None, handler=self.handler,
                     max_backoff=MAX_BACKOFF, watch_timeout=WATCH_TIMEOUT)
            for selector in self.selectors if selector is not None]

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        for informer in self.informers:
            informer.start(loop)

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop(timeout=0.1)

    @property
    def synced(self) -> bool:
        return all(i.synced for i in self.informers)

    @property
    def errors(self) -> int:
        """Failed lists and watches so far: when it grows, the API may be away."""
        return sum(i.errors for i in self.informers)

    def get(self, key: RemoteKey) -> Obj | None:
        for informer in self.informers:
            obj = informer.cache.get(str(key))
            if obj is not None and not is_mirror(obj):
                return obj
        return None

    def service_keys(self) -> set[RemoteKey]:
        return {RemoteKey(*k.split("/", 1)) for i in self.informers for k, o in i.cache.items()
                if not is_mirror(o)}

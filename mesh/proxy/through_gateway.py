"""Discovery for a proxy outside the cluster's pod network (an enrolled VM): every
meshed pod is reached through the home cluster's gateway.

`ThroughGateway` wraps the proxy's `Discovery` and hands out services whose
endpoints a VM can dial: the meshed pods of a service become one endpoint, the
gateway, told the service's name and port in the transport header (its
``authority``), which is how the gateway routes a connection (gateway/exports.py);
endpoints already reached through a gateway (a linked cluster's mirror) stay as
they are; endpoints outside the mesh are dropped, since the gateway forwards only
to meshed pods. Subscribers see the rewritten services, updates and removals too.

It rewrites a service once per change of it, not per connection: the rewritten
spec is kept beside the one it came from and used while that one is current.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from mesh.proxy.discovery import Discovery, EndpointSpec, ServiceSpec


def through_gateway(service: ServiceSpec, *, address: str, identity: str) -> ServiceSpec:
    """`service` as reached through the gateway at ``address`` presenting ``identity``.

    Its meshed, directly dialled endpoints become one gateway endpoint, in the
    best priority group among them and with their summed weight, so that it keeps
    their share beside endpoints that stay.
    """
    direct = [ep for ep in service.endpoints if ep.authority is None and ep.meshed]
    kept = [ep for ep in service.endpoints if ep.authority is not None]
    if direct:
        kept.insert(0, EndpointSpec(address=address, target_port=service.host_port[1],
                                    identity=identity, authority=service.name,
                                    weight=sum(ep.weight for ep in direct),
                                    priority=min(ep.priority for ep in direct)))
    if kept == service.endpoints:
        return service
    return msgspec.structs.replace(service, endpoints=kept)


class ThroughGateway:
    """A `Discovery` whose services are `inner`'s as reached through a gateway."""

    def __init__(self, inner: Discovery, *, address: str, identity: str) -> None:
        self.inner = inner
        self.address = address
        self.identity = identity
        self._rewritten: dict[str, tuple[ServiceSpec, ServiceSpec]] = {}
        """Service address -> (inner's spec, its rewrite)."""

    def resolve(self, address: tuple[str, int]) -> ServiceSpec | None:
        service = self.inner.resolve(address)
        return self.rewrite(service) if service is not None else None

    def resolve_name(self, authority: str) -> ServiceSpec | None:
        service = self.inner.resolve_name(authority)
        return self.rewrite(service) if service is not None else None

    def services(self) -> list[ServiceSpec]:
        return [self.rewrite(service) for service in self.inner.services()]

    def subscribe(self, callback: Callable[[ServiceSpec], None]) -> Callable[[], None]:
        return self.inner.subscribe(lambda service: callback(self.rewrite(service)))

    def rewrite(self, service: ServiceSpec) -> ServiceSpec:
        """`through_gateway` of `service`, computed once per spec that inner hands out."""
        cached = self._rewritten.get(service.address)
        if cached is not None and cached[0] is service:
            return cached[1]
        out = through_gateway(service, address=self.address, identity=self.identity)
        if service.endpoints:
            self._rewritten[service.address] = (service, out)
        else:  # gone, or drained: nothing worth keeping
            self._rewritten.pop(service.address, None)
        return out

"""DNS for mesh names on a VM.

`MeshNames` is the table of the home cluster's service names the agent learns
from the control plane (`web.default.svc.cluster.local -> 10.96.0.12`, and the
mirrors of linked clusters' services, which are ordinary local names such as
`web-west.default.svc.cluster.local`), as a mesh.dns.Zone: it answers A/AAAA for
known names (TTL 5 s), NODATA with the SOA for a known name without addresses of
the asked type, authoritative NXDOMAIN for any other name under the cluster
domain, and "forward" for names outside it. A name under the cluster domain is
never forwarded, so internal names do not leak to the VM's outside resolvers.

`MeshDnsServer` serves it on one loopback address over UDP and TCP (default
127.0.0.153:53) with mesh.dnsserver, forwarding the rest to the VM's original
nameservers in order (timeout each, next on failure, TCP when a UDP answer is
truncated, SERVFAIL when none answers). Counters: `dns_answers_total{source}`
with source local / forwarded / failed, and `dns_queries_total{rcode}`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

import dns.exception
import dns.message
import dns.name
from prometheus_client import CollectorRegistry

from mesh.dns import TTL, Address, Forward, Reply, Zone, address_rdatas, format_address, respond
from mesh.dnsserver import DNSServer, bind_sockets
from mesh.errors import ConfigError, DiscoveryError

log = logging.getLogger(__name__)

DEFAULT_LISTEN: Address = ("127.0.0.153", 53)


class MeshNames:
    """The cluster's service names and addresses as the VM answers them."""

    def __init__(self, cluster_domain: str = "cluster.local", *, ttl: int = TTL) -> None:
        self.zone = Zone(cluster_domain, ttl=ttl)
        self._addresses: dict[dns.name.Name, tuple[str, ...]] = {}

    @property
    def cluster_domain(self) -> str:
        return self.zone.origin.to_text(omit_final_dot=True)

    def set(self, name: str, addresses: Iterable[str]) -> None:
        """`name` resolves to `addresses` (none: it exists, with no address records)."""
        owner = self._owner(name)
        ips = []
        for text in addresses:
            try:
                ips.append(str(ipaddress.ip_address(text)))
            except ValueError:
                raise DiscoveryError(f"service name {name}: {text!r} is not an IP address; "
                                     f"the control plane sent a bad address for it") from None
        kept = tuple(sorted(set(ips)))
        if self._addresses.get(owner) == kept:
            return
        self.zone.discard(owner)
        self.zone.add(owner, address_rdatas(kept))
        self._addresses[owner] = kept

    def remove(self, name: str) -> None:
        """`name` no longer exists; removing an unknown name does nothing."""
        owner = self._owner(name)
        self.zone.discard(owner)
        self._addresses.pop(owner, None)

    def table(self) -> dict[str, tuple[str, ...]]:
        """Every name (without the final dot) and its addresses, for status output."""
        return {n.to_text(omit_final_dot=True): ips for n, ips in sorted(self._addresses.items())}

    def answer(self, request: dns.message.Message) -> Reply | Forward:
        """The reply to a query for a name under the cluster domain, else Forward."""
        return respond(self.zone, request, synced=True, forwarding=True)

    def _owner(self, name: str) -> dns.name.Name:
        try:
            owner = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            raise DiscoveryError(f"service name {name!r} is not a DNS name: {e}") from e
        if not owner.is_subdomain(self.zone.svc) or owner == self.zone.svc:
            raise DiscoveryError(f"service name {name!r} is not under {self.zone.svc}; "
                                 f"only the cluster's service names are answered on the VM")
        return owner


class MeshDnsServer:
    """`names` on `listen` (UDP and TCP), the rest forwarded to `upstreams`."""

    def __init__(self, names: MeshNames, listen: Address = DEFAULT_LISTEN, *,
                 upstreams: Sequence[Address], registry: CollectorRegistry | None = None,
                 upstream_timeout: float = 2.0) -> None:
        if any(tuple(u) == tuple(listen) for u in upstreams):
            raise ConfigError(f"DNS upstream {format_address(listen)} is the mesh DNS server "
                              f"itself; give the VM's original nameservers as upstreams")
        self.names = names
        self.listen = listen
        self._server = DNSServer(names.answer, upstreams=upstreams,
                                 upstream_timeout=upstream_timeout, registry=registry)

    @property
    def address(self) -> Address:
        return self._server.address

    @property
    def upstreams(self) -> tuple[Address, ...]:
        return self._server.upstreams

    async def start(self) -> None:
        """Listen; ConfigError when the address cannot be bound (in use, not local)."""
        udp, tcp = bind_sockets(*self.listen)
        try:
            await self._server.listen(udp, tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        log.info("dns: serving domain=%s listen=%s upstreams=%s", self.names.cluster_domain,
                 format_address(self.address),
                 ",".join(format_address(u) for u in self.upstreams) or "none")

    async def stop(self) -> None:
        await self._server.close()
        log.info("dns: stopped listen=%s", format_address(self.address))

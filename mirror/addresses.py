"""The gateway's addresses: a Link's ``gatewayAddress`` entries, IPs taken as
they are and DNS names resolved (A and AAAA) with dnspython's asynchronous
resolver, each re-resolved when its TTL runs out.

A name that stops resolving keeps the addresses it last had, is logged once
when it starts failing and once when it recovers, and is retried with backoff.
The resolver and the clock are injected, so the logic is tested without a
network or a wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

from mirror.errors import MirrorError

log = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[tuple[list[str], float]]]
"""A DNS name -> (its addresses, seconds they may be kept); raises `MirrorError`."""

MIN_TTL = 1.0
MAX_TTL = 300.0
RETRY_MIN, RETRY_MAX = 1.0, 30.0


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class DnsResolver:
    """`Resolve` over dnspython's asyncio resolver (the system's nameservers)."""

    def __init__(self, lifetime: float = 5.0) -> None:
        self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = lifetime

    async def __call__(self, name: str) -> tuple[list[str], float]:
        answers = await asyncio.gather(
            *(self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
              for rdtype in ("A", "AAAA")), return_exceptions=True)
        addresses: list[str] = []
        ttls: list[float] = []
        errors: list[str] = []
        for answer in answers:
            if isinstance(answer, dns.exception.DNSException):
                errors.append(_describe(answer))
                continue
            if isinstance(answer, BaseException):
                raise answer
            if answer.rrset is not None:
                addresses += [str(r.address) for r in answer.rrset]
                ttls.append(float(answer.rrset.ttl))
        if not addresses:
            cause = "; ".join(dict.fromkeys(errors)) or "it has no A or AAAA records"
            raise MirrorError(f"gateway address {name} does not resolve: {cause}")
        return sorted(set(addresses)), min(ttls)


def _describe(e: dns.exception.DNSException) -> str:
    if isinstance(e, dns.resolver.NXDOMAIN):
        return "no such name (NXDOMAIN)"
    if isinstance(e, dns.resolver.LifetimeTimeout):
        return "the nameservers did not answer in time"
    if isinstance(e, dns.resolver.NoNameservers):
        return "no nameserver could answer"
    return f"{type(e).__name__}: {e}"


@dataclass
class _Name:
    name: str
    addresses: tuple[str, ...] = ()
    due: float = 0.0
    failures: int = 0


@dataclass
class GatewayAddresses:
    """The current addresses of a gateway given as ``entries`` (names or IPs)."""

    entries: Sequence[str]
    resolve: Resolve
    clock: Callable[[], float] = time.monotonic
    _names: dict[str, _Name] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        now = self.clock()
        self._names = {e: _Name(e, due=now) for e in self.entries if not is_ip(e)}

    def addresses(self) -> list[str]:
        """Every address known now: the IP entries and what the names last resolved to."""
        out: list[str] = []
        for entry in self.entries:
            name = self._names.get(entry)
            out += [entry] if name is None else list(name.addresses)
        return sorted(dict.fromkeys(str(ipaddress.ip_address(a)) for a in out))

    def next_due(self) -> float | None:
        """When the next name is due to be resolved again; None if there are no names."""
        return min((n.due for n in self._names.values()), default=None)

    async def refresh(self) -> bool:
        """Resolve the names whose TTL has run out; returns whether the addresses changed."""
        now = self.clock()
        due = [n for n in self._names.values() if n.due <= now]
        if not due:
            return False
        before = self.addresses()
        results = await asyncio.gather(*(self._resolve(n) for n in due), return_exceptions=True)
        for name, result in zip(due, results, strict=True):
            if isinstance(result, MirrorError):
                self._failed(name, str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                self._resolved(name, *result)
        return self.addresses() != before

    async def run(self, on_change: Callable[[], None]) -> None:
        """Keep the addresses current until cancelled; call `on_change` when they change."""
        while True:
            if await self.refresh():
                on_change()
            due = self.next_due()
            if due is None:
                return  # only IPs: nothing will ever change
            await asyncio.sleep(max(0.05, due - self.clock()))

    async def _resolve(self, name: _Name) -> tuple[list[str], float]:
        return await self.resolve(name.name)

    def _resolved(self, name: _Name, addresses: list[str], ttl: float) -> None:
        if name.failures:
            log.info("gateway address resolves again name=%s addresses=%s", name.name,
                     ",".join(addresses))
        elif tuple(addresses) != name.addresses and name.addresses:
            log.info("gateway address changed name=%s addresses=%s before=%s", name.name,
                     ",".join(addresses), ",".join(name.addresses))
        name.addresses = tuple(sorted(addresses))
        name.failures = 0
        name.due = self.clock() + min(MAX_TTL, max(MIN_TTL, ttl))

    def _failed(self, name: _Name, cause: str) -> None:
        name.failures += 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** (name.failures - 1))
        name.due = self.clock() + delay
        if name.failures == 1:
            kept = ",".join(name.addresses) or "none"
            log.warning("gateway address not resolved name=%s kept=%s retry_in=%.0fs cause=%s",
                        name.name, kept, delay, cause)

"""Service discovery as the proxy sees it: which service an address or authority
names, and which endpoints stand behind it.

`Discovery` is the interface the proxy depends on; `StaticDiscovery` reads it
from a YAML or JSON file. The models here are the boundary where discovery data
comes in, so every field is checked once, and a bad file is reported with one
line per error naming the file, the field path and the reason. A reload that
finds the file broken or gone keeps the last good data: the proxy goes on
routing on what it last knew (DESIGN.md, "Data plane").
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec
import yaml

from mesh.errors import ConfigError, IdentityError
from mesh.identity.names import Identity
from mesh.structs import FieldError, convert, problems

log = logging.getLogger(__name__)

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$")
_SERVICE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 hosts are written ``[::1]:4143``.

    Raises ValueError naming what is wrong; the host comes back without brackets.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not host:port; write IPv6 as [2001:db8::1]:4143")
        _check_ipv6(host, text)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port, such as 10.0.0.7:4143")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 host must be in brackets, as in [{host}]:"
                             f"{port_text}")
        _check_host(host, text)
    return host, _port(port_text, text)


@functools.lru_cache(maxsize=4096)
def _split_cached(text: str) -> tuple[str, int]:
    """`split_host_port` of an address already validated, which proxies ask per request."""
    return split_host_port(text)


def _port(port_text: str, text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is outside 1..65535")
    return port


def _check_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None


def _check_host(host: str, text: str) -> None:
    labels = host.split(".")
    if all(label.isascii() and label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
        return
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a DNS host name")


def _host_port(text: str) -> str:
    split_host_port(text)
    return text


def _vip(text: str) -> str:
    host, _ = split_host_port(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: a service address is the IP and port apps dial, such as "
                         "10.96.0.10:80; a host name cannot be matched") from None
    return text


def _identity(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        Identity.parse(name)
    except IdentityError as e:
        raise ValueError(str(e)) from None
    return name


def _service_name(name: str) -> str:
    if len(name) > 253 or not _SERVICE_NAME.match(name):
        raise ValueError(f"{name!r} is not a lowercase DNS name such as "
                         "web.default.svc.cluster.local")
    return name


def canonical_address(host: str, port: int) -> tuple[str, int]:
    """One spelling per address, so ``::1`` and ``0::1`` find the same service."""
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return host.lower().rstrip("."), port


def _check(field: str, check: Callable[[str], object], value: str) -> None:
    try:
        check(value)
    except ValueError as e:
        raise FieldError(field, str(e)) from None


def _in_range(field: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise FieldError(field, f"must be {bound}, got {value}")


class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   rename={"target_port": "targetPort", "authority": "authorityOverride"}):
    """One destination workload, as the caller's proxy reaches it."""

    address: str
    """host:port of the destination proxy's inbound listener (or of the app when not meshed)."""
    target_port: int
    """The port the app listens on at the destination; sent in the transport header."""
    identity: str | None = None
    """The TLS identity the destination must present; None: not meshed, plain TCP."""
    weight: int = 1
    priority: int = 0
    """The priority group: lower is preferred; higher groups take traffic on failover."""
    zone: str = ""
    cluster: str = ""
    """The cluster the endpoint runs in, when discovery knows it."""
    authority: str | None = None
    """The service name to send in the transport header instead of the service's own:
    for a linked cluster's gateway, the service's name over there."""

    def __post_init__(self) -> None:
        _check("address", _host_port, self.address)
        _in_range("targetPort", self.target_port, 1, 65535)
        if self.identity is not None:
            _check("identity", _identity, self.identity)
        _in_range("weight", self.weight, 1)
        _in_range("priority", self.priority, 0)

    @property
    def host_port(self) -> tuple[str, int]:
        return _split_cached(self.address)

    @property
    def meshed(self) -> bool:
        return self.identity is not None


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                  rename={"failback_s": "failbackSeconds"}):
    """A service: the address apps dial and the endpoints behind it."""

    name: str
    address: str
    """VIP:port, the address apps dial."""
    opaque: bool = False
    """Relay bytes without looking for HTTP."""
    endpoints: list[EndpointSpec]
    failback_s: float | None = None
    """Seconds a preferred priority group must stay healthy before traffic returns to
    it (a failover Service's ``failover.meshgate.io/policy``); None: the proxy's default."""

    def __post_init__(self) -> None:
        _check("name", _service_name, self.name)
        _check("address", _vip, self.address)
        if self.failback_s is not None and not self.failback_s > 0:
            raise FieldError("failbackSeconds", f"must be greater than 0, got {self.failback_s}")
        seen: dict[tuple[tuple[str, int], int], int] = {}
        for i, ep in enumerate(self.endpoints):
            key = (canonical_address(*ep.host_port), ep.target_port)
            if key in seen:
                raise FieldError(f"endpoints[{i}]", f"endpoint {ep.address} targetPort "
                                 f"{ep.target_port} is already listed as endpoints[{seen[key]}]")
            seen[key] = i

    @property
    def host_port(self) -> tuple[str, int]:
        return _split_cached(self.address)

    def without_endpoints(self) -> ServiceSpec:
        """This service with no endpoints: how one that went away is announced."""
        return msgspec.structs.replace(self, endpoints=[])


class DiscoveryFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole of a static discovery file."""

    services: list[ServiceSpec]

    def __post_init__(self) -> None:
        services = self.services
        by_address: dict[tuple[str, int], int] = {}
        by_authority: dict[tuple[str, int], int] = {}
        for i, svc in enumerate(services):
            vip = canonical_address(*svc.host_port)
            if vip in by_address:
                j = by_address[vip]
                raise FieldError(f"services[{i}].address", f"{svc.address} is already the "
                                 f"address of services[{j}] ({services[j].name})")
            authority = (svc.name, vip[1])
            if authority in by_authority:
                j = by_authority[authority]
                raise FieldError(f"services[{i}].name", f"{svc.name} port {vip[1]} is already "
                                 f"served by services[{j}] ({services[j].address})")
            by_address[vip] = by_authority[authority] = i


class Discovery(Protocol):
    """What the proxy asks of service discovery."""

    def resolve(self, address: tuple[str, int]) -> ServiceSpec | None:
        """The service whose VIP:port is `address` (the original destination)."""
        ...

    def resolve_name(self, authority: str) -> ServiceSpec | None:
        """The service an HTTP authority (``name:port`` or ``name``) names."""
        ...

    def services(self) -> list[ServiceSpec]: ...

    def subscribe(self, callback: Callable[[ServiceSpec], None]) -> Callable[[], None]:
        """Call `callback` with each service that changes; returns the unsubscribe call.

        A service that goes away is announced once more with no endpoints, so that
        whatever balances over it drains.
        """
        ...


class StaticDiscovery:
    """Discovery read from a YAML or JSON file; `reload()` picks up edits."""

    def __init__(self, data: DiscoveryFile, *, path: Path | None = None) -> None:
        self.path = path
        self._by_address: dict[tuple[str, int], ServiceSpec] = {}
        self._by_authority: dict[tuple[str, int], ServiceSpec] = {}
        self._by_name: dict[str, list[ServiceSpec]] = {}
        self._subscribers: list[Callable[[ServiceSpec], None]] = []
        self._index(data.services)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StaticDiscovery:
        """Read and check a discovery file; raises ConfigError naming every problem."""
        p = Path(path)
        return cls(read_discovery_file(p), path=p)

    @classmethod
    def empty(cls) -> StaticDiscovery:
        """Discovery that knows no service (a proxy started without a discovery file)."""
        return cls(DiscoveryFile(services=[]))

    def reload(self) -> bool:
        """Re-read the file and announce the services that changed.

        Returns False, logs one line with the cause and keeps the last good data when
        the file cannot be read or is invalid.
        """
        if self.path is None:
            raise ConfigError("this discovery was not loaded from a file; nothing to reload")
        try:
            data = read_discovery_file(self.path)
        except ConfigError as e:
            cause = "; ".join(str(e).splitlines())
            log.warning("discovery reload failed file=%s cause=%s; keeping the last good data "
                        "services=%d", self.path, cause, len(self._by_address))
            return False
        changed = self._index(data.services)
        if changed:
            log.info("discovery reloaded file=%s services=%d changed=%s", self.path,
                     len(self._by_address), ",".join(svc.name for svc in changed))
        for svc in changed:
            self._announce(svc)
        return True

    def resolve(self, address: tuple[str, int]) -> ServiceSpec | None:
        return self._by_address.get(canonical_address(*address))

    def resolve_name(self, authority: str) -> ServiceSpec | None:
        """``name:port`` matches name and VIP port; a bare name matches the only
        service of that name, or the one on port 80 (HTTP's default). An IP literal
        is looked up as an address."""
        parsed = _split_authority(authority)
        if parsed is None:
            return None
        host, port = parsed
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return self.resolve((host, port or 80))
        if port:
            return self._by_authority.get((host, port))
        candidates = self._by_name.get(host, [])
        if len(candidates) == 1:
            return candidates[0]
        return self._by_authority.get((host, 80))

    def services(self) -> list[ServiceSpec]:
        return list(self._by_address.values())

    def subscribe(self, callback: Callable[[ServiceSpec], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def _index(self, services: Iterable[ServiceSpec]) -> list[ServiceSpec]:
        """Install `services`; return what changed, removed ones without endpoints."""
        old = self._by_address
        new = {canonical_address(*svc.host_port): svc for svc in services}
        changed = [svc for key, svc in new.items() if old.get(key) != svc]
        changed += [svc.without_endpoints()
                    for key, svc in old.items() if key not in new]
        self._by_address = new
        self._by_authority = {(svc.name, key[1]): svc for key, svc in new.items()}
        self._by_name = {}
        for svc in new.values():
            self._by_name.setdefault(svc.name, []).append(svc)
        return changed

    def _announce(self, svc: ServiceSpec) -> None:
        for callback in list(self._subscribers):
            try:
                callback(svc)
            except Exception:
                # One broken subscriber must not starve the others of updates.
                log.exception("discovery subscriber failed service=%s address=%s callback=%r",
                              svc.name, svc.address, callback)


def _split_authority(authority: str) -> tuple[str, int] | None:
    """An HTTP authority as (host, port), port 0 when absent; None when malformed.

    Laxer than `split_host_port`: a Host header may carry a trailing dot, any case,
    or no port, and is matched against known names rather than trusted.
    """
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.rpartition(":") if ":" in authority else (
            authority, "", "")
        if ":" in host:
            return None  # IPv6 must be bracketed in an authority (RFC 3986)
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        return None
    port = int(port_text) if port_text else 0
    if not host or port > 65535:
        return None
    return host.lower().rstrip("."), port


def read_discovery_file(path: Path) -> DiscoveryFile:
    """Parse and validate a discovery file; ConfigError lists every problem, one a line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read discovery file: {e}") from e
    raw = _parse(path, text)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping with a 'services' list at the top, "
                          f"got {type(raw).__name__}")
    try:
        return convert(raw, DiscoveryFile)
    except msgspec.ValidationError:
        lines = [f"{path}: {where or '(top level)'}: {reason}"
                 for where, reason in problems(raw, DiscoveryFile)]
        raise ConfigError("\n".join(lines)) from None


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None

"""Configuration values shared by every command: durations and addresses as
people write them, checked once where they come in."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
import yaml

from mesh.authz import AccessPolicy
from mesh.errors import ConfigError, IdentityError
from mesh.identity.names import Identity
from mesh.proxy.detect import DEFAULT_OPAQUE_PORTS
from mesh.structs import Checked, FieldError, convert, problems

M = TypeVar("M", bound=msgspec.Struct)

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """``90s``, ``15m``, ``24h``, ``1h30m``, ``365d`` -> timedelta (must be positive)."""
    s = text.strip()
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ConfigError(f"{what} {text!r} is not a duration such as 90s, 15m, 24h or 1h30m")
    return timedelta(seconds=total)


# -- the proxy's configuration file ------------------------------------------------------

class Duration(timedelta):
    """A positive duration, written ``90s``, ``15m``, ``1h30m`` or as seconds."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, timedelta):
            return cls(seconds=value.total_seconds())
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(seconds=value)
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a duration such as 90s, 15m, 24h or 1h30m")
        try:
            return cls(seconds=parse_duration(value).total_seconds())
        except ConfigError as e:
            raise ValueError(str(e)) from None


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _identity_pattern(value: str) -> str:
    """An exact identity name, or ``*.`` and a suffix of identity names (not ``*`` alone:
    trusting every identity as a gateway would let any workload name its caller)."""
    if value.startswith("*."):
        if len(value) > 255 or not _DNS_NAME.match(value[2:]):
            raise ValueError(f"{value!r}: after '*.' must come a DNS suffix such as "
                             "multicluster.serviceaccount.identity.meshgate.cluster.local")
        return value
    try:
        Identity.parse(value)
    except IdentityError as e:
        raise ValueError(f"{e}; or write '*.' and a suffix to match several") from None
    return value


def check_identity_pattern(value: str) -> str:
    """`value` if it is an identity pattern a proxy accepts (a trusted gateway's); a
    ValueError saying why not."""
    return _identity_pattern(value)


def _label_selector(value: str) -> str:
    """``key=value``: one label a Service must carry."""
    key, sep, label = value.partition("=")
    if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(label):
        raise ValueError(f"{value!r} is not KEY=VALUE, such as mirror.meshgate.io/exported=true")
    return value


def _dns_name(value: str) -> str:
    if len(value) > 253 or not _DNS_NAME.match(value):
        raise ValueError(f"{value!r} is not a lowercase DNS name such as cluster.local")
    return value


def _identity_name(value: str) -> str:
    try:
        Identity.parse(value)
    except IdentityError as e:
        raise ValueError(str(e)) from None
    return value


def split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _Model(Checked, frozen=True, kw_only=True, forbid_unknown_fields=True,
             rename="camel"):
    pass


class IdentityConfig(_Model, frozen=True, kw_only=True):
    """Where the proxy's certificate comes from: files never renewed (certFile and
    keyFile); the identity service (server and tokenFile); or files held from
    before and renewed through the identity service, written back on each renewal
    (server, certFile and keyFile, as on an enrolled VM; tokenFile then serves only
    when the held certificate cannot prove the identity any more)."""

    name: str
    trust_bundle: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server: str | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.cert_file is None) != (self.key_file is None):
            raise FieldError("", "give certFile and keyFile together")
        files = self.cert_file is not None
        if self.server is None and (not files or self.token_file is not None):
            raise FieldError("", "give certFile and keyFile (files, never renewed), server and "
                             "tokenFile (a certificate from the identity service), or server, "
                             "certFile and keyFile (held files renewed through the identity "
                             "service)")
        if self.server is not None and not files and self.token_file is None:
            raise FieldError("", "server needs tokenFile, or certFile and keyFile holding a "
                             "certificate to renew")

    @property
    def renewed_files(self) -> bool:
        """Held certificate files that the identity service renews (a VM's)."""
        return self.server is not None and self.cert_file is not None


class InboundConfig(_Model, frozen=True, kw_only=True):
    __field_checks__ = {"listen": _address, "trusted_gateways": _identity_pattern}

    listen: str = "0.0.0.0:4143"
    app_host: str = "127.0.0.1"
    """Where the local application listens; the transport header gives the port."""
    authorized: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Identity names allowed to connect, or "*" for every identity of the trust bundle."""
    trusted_gateways: list[str] = msgspec.field(default_factory=list)
    """Gateways whose forwarded caller (transport header field 100) is authorized and
    counted instead of the gateway; field 100 from any other peer is refused."""


class HomeGatewayConfig(_Model, frozen=True, kw_only=True):
    """The home cluster's gateway, for a proxy with no route to the pod network (an
    enrolled VM): meshed pods are reached through it."""

    __field_checks__ = {"address": _address, "identity": _identity_name}

    address: str
    """HOST:PORT of the gateway's mTLS listener."""
    identity: str
    """The identity the gateway must present."""


class OutboundConfig(_Model, frozen=True, kw_only=True):
    __field_checks__ = {"listen": _address}

    listen: str = "127.0.0.1:4140"
    redirect: bool = True
    """Also listen on every service address in discovery (the redirected listeners)."""
    connect_timeout: Duration = Duration(seconds=1)
    request_timeout: Duration = Duration(seconds=10)
    opaque_ports: list[int] = msgspec.field(default_factory=lambda: sorted(DEFAULT_OPAQUE_PORTS))
    """Service ports relayed without protocol detection, whatever the Service says:
    Linkerd's default list (server-speaks-first protocols, whose clients would wait
    `detectTimeout` for their greeting); ``[]`` turns it off. A Service adds its own
    with the annotation ``config.meshgate.io/opaque-ports``."""
    failback_hold_down: Duration = Duration(seconds=5)
    """How long a failover service's better priority group must stay healthy (its
    probes succeeding) before traffic returns to it; doubled, up to a minute or this
    if longer, each time the group fails again within that (mesh.proxy.failover)."""
    gateway: HomeGatewayConfig | None = None
    """Reach every meshed pod through this gateway instead of directly (see
    mesh.proxy.through_gateway); endpoints outside the mesh are then out of reach."""


class AdminConfig(_Model, frozen=True, kw_only=True):
    __field_checks__ = {"listen": _address}

    listen: str = "127.0.0.1:4191"


class DestinationConfig(_Model, frozen=True, kw_only=True):
    """The control plane that serves discovery (and policy, given `workload`)."""

    server: str
    """https://HOST:PORT of `meshgate control run`."""
    server_identity: str | None = None
    """The identity it must present; default: the identity service's of the trust domain."""


class WorkloadConfig(_Model, frozen=True, kw_only=True):
    """The workload this proxy serves, for its inbound policy: a pod, or an
    ExternalWorkload (the proxy of a VM); exactly one of them."""

    namespace: str
    pod: str | None = None
    external_workload: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pod is None) == (self.external_workload is None):
            raise FieldError("", "give exactly one of pod and externalWorkload")


class ProxyConfig(_Model, frozen=True, kw_only=True):
    identity: IdentityConfig
    discovery: Path | None = None
    """A static discovery file (services and their endpoints)."""
    destination: DestinationConfig | None = None
    workload: WorkloadConfig | None = None
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    detect_timeout: Duration = Duration(seconds=10)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discovery is not None and self.destination is not None:
            raise FieldError("", "give either discovery (a file) or destination (the control "
                             "plane), not both")
        if self.workload is not None and self.destination is None:
            raise FieldError("", "workload needs destination: its policy comes from the "
                             "control plane")


class GatewayConfig(_Model, frozen=True, kw_only=True):
    """``meshgate gateway run --config``: the multicluster gateway of one cluster."""

    identity: IdentityConfig
    kubeconfig: Path
    """The cluster the gateway serves: its Services, endpoints, Pods and policies."""
    __field_checks__ = {"listen": _address, "admin": _address,
                        "exported_label": _label_selector, "cluster_domain": _dns_name,
                        "trusted_gateways": _identity_pattern}

    listen: str = "0.0.0.0:4143"
    admin: str = "0.0.0.0:4191"
    exported_label: str = "mirror.meshgate.io/exported=true"
    """Only Services carrying this label are reachable through the gateway."""
    cluster_domain: str = "cluster.local"
    trusted_gateways: list[str] = msgspec.field(default_factory=list)
    """Other gateways whose forwarded caller (field 100) this gateway honours."""
    default_policy: AccessPolicy = AccessPolicy.ALL_AUTHENTICATED
    """Decides for pod ports that no Server selects, as the control plane's default."""
    connect_timeout: Duration = Duration(seconds=1)
    handshake_timeout: Duration = Duration(seconds=10)
    header_timeout: Duration = Duration(seconds=10)


def load_model(path: Path, model: type[M], *, what: str) -> M:
    """Read YAML or JSON from ``path`` into ``model``; a ConfigError names every bad field."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML or JSON: "
                          f"{str(e).splitlines()[0]}") from e
    raw = raw if raw is not None else {}
    try:
        return convert(raw, model)
    except msgspec.ValidationError as e:
        lines = [f"{where or '<top level>'}: {reason}" for where, reason in problems(raw, model)]
        raise ConfigError(f"{what} {path} is invalid: " + "; ".join(lines)) from e

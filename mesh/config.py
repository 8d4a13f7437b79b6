"""Configuration values shared by every command: durations and addresses as
people write them, checked once where they come in."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from mesh.authz import AccessPolicy
from mesh.errors import ConfigError, IdentityError
from mesh.identity.names import Identity
from mesh.proxy.detect import DEFAULT_OPAQUE_PORTS

M = TypeVar("M", bound=BaseModel)

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

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


Address = Annotated[str, AfterValidator(_address)]


def _duration(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except ConfigError as e:  # pydantic reports ValueErrors with the field's path
        raise ValueError(str(e)) from None


Duration = Annotated[timedelta, BeforeValidator(_duration)]


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


IdentityPattern = Annotated[str, AfterValidator(_identity_pattern)]
IdentityName = Annotated[str, AfterValidator(_identity_name)]
LabelSelector = Annotated[str, AfterValidator(_label_selector)]
DnsName = Annotated[str, AfterValidator(_dns_name)]


def split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class IdentityConfig(_Model):
    """Where the proxy's certificate comes from: files never renewed (certFile and
    keyFile); the identity service (server and tokenFile); or files held from
    before and renewed through the identity service, written back on each renewal
    (server, certFile and keyFile, as on an enrolled VM; tokenFile then serves only
    when the held certificate cannot prove the identity any more)."""

    name: str
    trust_bundle: Path = Field(alias="trustBundle")
    cert_file: Path | None = Field(None, alias="certFile")
    key_file: Path | None = Field(None, alias="keyFile")
    server: str | None = None
    token_file: Path | None = Field(None, alias="tokenFile")

    @model_validator(mode="after")
    def _one_source(self) -> IdentityConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give certFile and keyFile together")
        files = self.cert_file is not None
        if self.server is None and (not files or self.token_file is not None):
            raise ValueError("give certFile and keyFile (files, never renewed), server and "
                             "tokenFile (a certificate from the identity service), or server, "
                             "certFile and keyFile (held files renewed through the identity "
                             "service)")
        if self.server is not None and not files and self.token_file is None:
            raise ValueError("server needs tokenFile, or certFile and keyFile holding a "
                             "certificate to renew")
        return self

    @property
    def renewed_files(self) -> bool:
        """Held certificate files that the identity service renews (a VM's)."""
        return self.server is not None and self.cert_file is not None


class InboundConfig(_Model):
    listen: Address = "0.0.0.0:4143"
    app_host: str = Field("127.0.0.1", alias="appHost")
    """Where the local application listens; the transport header gives the port."""
    authorized: list[str] = Field(default_factory=lambda: ["*"])
    """Identity names allowed to connect, or "*" for every identity of the trust bundle."""
    trusted_gateways: list[IdentityPattern] = Field(default_factory=list,
                                                    alias="trustedGateways")
    """Gateways whose forwarded caller (transport header field 100) is authorized and
    counted instead of the gateway; field 100 from any other peer is refused."""


class HomeGatewayConfig(_Model):
    """The home cluster's gateway, for a proxy with no route to the pod network (an
    enrolled VM): meshed pods are reached through it."""

    address: Address
    """HOST:PORT of the gateway's mTLS listener."""
    identity: IdentityName
    """The identity the gateway must present."""


class OutboundConfig(_Model):
    listen: Address = "127.0.0.1:4140"
    redirect: bool = True
    """Also listen on every service address in discovery (the redirected listeners)."""
    connect_timeout: Duration = Field(timedelta(seconds=1), alias="connectTimeout")
    request_timeout: Duration = Field(timedelta(seconds=10), alias="requestTimeout")
    opaque_ports: list[int] = Field(default_factory=lambda: sorted(DEFAULT_OPAQUE_PORTS),
                                    alias="opaquePorts")
    """Service ports relayed without protocol detection, whatever the Service says:
    Linkerd's default list (server-speaks-first protocols, whose clients would wait
    `detectTimeout` for their greeting); ``[]`` turns it off. A Service adds its own
    with the annotation ``config.meshgate.io/opaque-ports``."""
    failback_hold_down: Duration = Field(timedelta(seconds=5), alias="failbackHoldDown")
    """How long a failover service's better priority group must stay healthy (its
    probes succeeding) before traffic returns to it; doubled, up to a minute or this
    if longer, each time the group fails again within that (mesh.proxy.failover)."""
    gateway: HomeGatewayConfig | None = None
    """Reach every meshed pod through this gateway instead of directly (see
    mesh.proxy.through_gateway); endpoints outside the mesh are then out of reach."""


class AdminConfig(_Model):
    listen: Address = "127.0.0.1:4191"


class DestinationConfig(_Model):
    """The control plane that serves discovery (and policy, given `workload`)."""

    server: str
    """https://HOST:PORT of `meshgate control run`."""
    server_identity: str | None = Field(None, alias="serverIdentity")
    """The identity it must present; default: the identity service's of the trust domain."""


class WorkloadConfig(_Model):
    """The workload this proxy serves, for its inbound policy: a pod, or an
    ExternalWorkload (the proxy of a VM); exactly one of them."""

    namespace: str
    pod: str | None = None
    external_workload: str | None = Field(None, alias="externalWorkload")

    @model_validator(mode="after")
    def _one_workload(self) -> WorkloadConfig:
        if (self.pod is None) == (self.external_workload is None):
            raise ValueError("give exactly one of pod and externalWorkload")
        return self


class ProxyConfig(_Model):
    identity: IdentityConfig
    discovery: Path | None = None
    """A static discovery file (services and their endpoints)."""
    destination: DestinationConfig | None = None
    workload: WorkloadConfig | None = None
    inbound: InboundConfig = InboundConfig()
    outbound: OutboundConfig = OutboundConfig()
    admin: AdminConfig = AdminConfig()
    detect_timeout: Duration = Field(timedelta(seconds=10), alias="detectTimeout")

    @model_validator(mode="after")
    def _one_discovery(self) -> ProxyConfig:
        if self.discovery is not None and self.destination is not None:
            raise ValueError("give either discovery (a file) or destination (the control "
                             "plane), not both")
        if self.workload is not None and self.destination is None:
            raise ValueError("workload needs destination: its policy comes from the control "
                             "plane")
        return self


class GatewayConfig(_Model):
    """``meshgate gateway run --config``: the multicluster gateway of one cluster."""

    identity: IdentityConfig
    kubeconfig: Path
    """The cluster the gateway serves: its Services, endpoints, Pods and policies."""
    listen: Address = "0.0.0.0:4143"
    admin: Address = "0.0.0.0:4191"
    exported_label: LabelSelector = Field("mirror.meshgate.io/exported=true",
                                          alias="exportedLabel")
    """Only Services carrying this label are reachable through the gateway."""
    cluster_domain: DnsName = Field("cluster.local", alias="clusterDomain")
    trusted_gateways: list[IdentityPattern] = Field(default_factory=list,
                                                    alias="trustedGateways")
    """Other gateways whose forwarded caller (field 100) this gateway honours."""
    default_policy: AccessPolicy = Field(AccessPolicy.ALL_AUTHENTICATED,
                                         alias="defaultPolicy")
    """Decides for pod ports that no Server selects, as the control plane's default."""
    connect_timeout: Duration = Field(timedelta(seconds=1), alias="connectTimeout")
    handshake_timeout: Duration = Field(timedelta(seconds=10), alias="handshakeTimeout")
    header_timeout: Duration = Field(timedelta(seconds=10), alias="headerTimeout")


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


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
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        lines = [f"{_field_path(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{what} {path} is invalid: " + "; ".join(lines)) from e

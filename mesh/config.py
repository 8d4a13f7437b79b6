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

from mesh.errors import ConfigError

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
Duration = Annotated[timedelta, BeforeValidator(
    lambda v: parse_duration(v) if isinstance(v, str) else v)]


def split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class IdentityConfig(_Model):
    """Where the proxy's certificate comes from: files, or the identity service."""

    name: str
    trust_bundle: Path = Field(alias="trustBundle")
    cert_file: Path | None = Field(None, alias="certFile")
    key_file: Path | None = Field(None, alias="keyFile")
    server: str | None = None
    token_file: Path | None = Field(None, alias="tokenFile")

    @model_validator(mode="after")
    def _one_source(self) -> IdentityConfig:
        files = self.cert_file is not None and self.key_file is not None
        service = self.server is not None and self.token_file is not None
        if files == service:
            raise ValueError("give either certFile and keyFile, or server and tokenFile")
        return self


class InboundConfig(_Model):
    listen: Address = "0.0.0.0:4143"
    app_host: str = Field("127.0.0.1", alias="appHost")
    """Where the local application listens; the transport header gives the port."""
    authorized: list[str] = Field(default_factory=lambda: ["*"])
    """Identity names allowed to connect, or "*" for every identity of the trust bundle."""
    opaque_ports: list[int] = Field(default_factory=list, alias="opaquePorts")


class OutboundConfig(_Model):
    listen: Address = "127.0.0.1:4140"
    redirect: bool = True
    """Also listen on every service address in discovery (the redirected listeners)."""
    connect_timeout: Duration = Field(timedelta(seconds=1), alias="connectTimeout")
    request_timeout: Duration = Field(timedelta(seconds=10), alias="requestTimeout")
    opaque_ports: list[int] = Field(default_factory=list, alias="opaquePorts")


class AdminConfig(_Model):
    listen: Address = "127.0.0.1:4191"


class DestinationConfig(_Model):
    """The control plane that serves discovery (and policy, given `workload`)."""

    server: str
    """https://HOST:PORT of `meshgate control run`."""
    server_identity: str | None = Field(None, alias="serverIdentity")
    """The identity it must present; default: the identity service's of the trust domain."""


class WorkloadConfig(_Model):
    """The pod this proxy serves, for its inbound policy."""

    namespace: str
    pod: str


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

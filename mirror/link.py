"""The Link resource (``multicluster.meshgate.io/v1alpha1``): its spec as a
checked model, in the shape of Linkerd's ``multicluster.linkerd.io`` v1alpha3
Link plus a namespace mapping.

Linkerd writes ports, durations and thresholds as strings (``"4143"``,
``"3s"``); both those and plain numbers are accepted. A spec that does not
parse raises `LinkSpecError` with one line per problem, naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from mesh.selector import LabelSelector
from mesh.structs import convert, explain
from mirror.errors import LinkSpecError

GROUP = "multicluster.meshgate.io"
VERSION = "v1alpha1"
PLURAL = "links"
KIND = "Link"
API_VERSION = f"{GROUP}/{VERSION}"

CREDENTIALS_SECRET_TYPE = "mirror.meshgate.io/remote-kubeconfig"
CREDENTIALS_SECRET_KEY = "kubeconfig"
FINALIZER = "mirror.meshgate.io/cleanup"
"""Held on a Link by its controller until the Link's mirrors are gone."""
EXPORTED_LABEL = "mirror.meshgate.io/exported"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*\.?$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a Go duration (``"3s"``, ``"500ms"``, ``"1m30s"``) or a number."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 3s or 500ms")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(f"{value!r} is not a duration such as 3s, 500ms or 1m30s")
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def _whole(low: int, high: int) -> Any:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value

    return BeforeValidator(parse)


def _dns_label(what: str) -> Any:
    def check(value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.match(value):
            raise ValueError(f"{what} {value!r} must be a lowercase DNS label (a-z, 0-9, '-', "
                             "at most 63 characters)")
        return value

    return AfterValidator(check)


Port = Annotated[int, _whole(1, 65535)]
Threshold = Annotated[int, _whole(1, 1000)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


def _selector(value: Any) -> LabelSelector:
    if isinstance(value, LabelSelector):
        return value
    try:
        return convert(value, LabelSelector)
    except msgspec.ValidationError as e:
        where, reason = explain(e, value, LabelSelector)
        raise ValueError(f"{where}: {reason}" if where else reason) from None


Selector = Annotated[LabelSelector, BeforeValidator(_selector)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True,
                              arbitrary_types_allowed=True)


EXPORTED = LabelSelector(match_labels={EXPORTED_LABEL: "true"})


class ProbeSpec(_Model):
    """How the gateway's liveness is probed: ``GET http://<address>:<port><path>``."""

    path: str = "/ready"
    port: Port = 4191
    period: Duration = 3.0
    timeout: Duration = 2.0
    failure_threshold: Threshold = Field(3, alias="failureThreshold")
    """Consecutive failed probes before the gateway counts as not alive."""
    success_threshold: Threshold = Field(1, alias="successThreshold")
    """Consecutive good probes before a gateway that was not alive is alive again."""

    @model_validator(mode="after")
    def _path_is_absolute(self) -> ProbeSpec:
        if not self.path.startswith("/"):
            raise ValueError(f"probeSpec.path {self.path!r} must start with /")
        return self


def _gateway_addresses(value: str) -> str:
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            if len(entry) > 253 or not _DNS_NAME.match(entry):
                raise ValueError(f"gateway address {entry!r} is neither an IP address nor a "
                                 "DNS name") from None
    return value


def _namespace_mapping(value: dict[str, str]) -> dict[str, str]:
    for remote, local in value.items():
        for ns in (remote, local):
            if len(ns) > 63 or not _DNS_LABEL.match(ns):
                raise ValueError(f"namespace {ns!r} is not a valid namespace name")
    return value


class LinkSpec(_Model):
    target_cluster_name: Annotated[str, _dns_label("targetClusterName")] = Field(
        alias="targetClusterName")
    target_cluster_domain: str = Field("cluster.local", alias="targetClusterDomain",
                                       pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    cluster_credentials_secret: Annotated[str, _dns_label("clusterCredentialsSecret")] = Field(
        alias="clusterCredentialsSecret")
    gateway_address: Annotated[str, AfterValidator(_gateway_addresses)] = Field(
        "", alias="gatewayAddress")
    gateway_port: Port = Field(4143, alias="gatewayPort")
    gateway_identity: str = Field("", alias="gatewayIdentity")
    probe_spec: ProbeSpec = Field(default_factory=ProbeSpec, alias="probeSpec")
    selector: Selector = EXPORTED
    remote_discovery_selector: Selector | None = Field(None, alias="remoteDiscoverySelector")
    excluded_labels: tuple[str, ...] = Field((), alias="excludedLabels")
    excluded_annotations: tuple[str, ...] = Field((), alias="excludedAnnotations")
    namespace_mapping: Annotated[dict[str, str], AfterValidator(_namespace_mapping)] = Field(
        default_factory=dict, alias="namespaceMapping")

    @property
    def gateway_addresses(self) -> tuple[str, ...]:
        """The gatewayAddress entries (names or IPs), in order, without blanks."""
        return tuple(e.strip() for e in self.gateway_address.split(",") if e.strip())

    def local_namespace(self, remote_namespace: str) -> str:
        return self.namespace_mapping.get(remote_namespace, remote_namespace)


def parse_spec(link: Mapping[str, Any]) -> LinkSpec:
    """The Link's spec, checked; raises `LinkSpecError` naming each bad field."""
    meta = link.get("metadata") or {}
    where = f"Link {meta.get('namespace')}/{meta.get('name')}"
    try:
        return LinkSpec.model_validate(link.get("spec") or {})
    except ValidationError as e:
        problems = "; ".join(f"spec.{path}: {reason}" for path, reason in _explain(e))
        raise LinkSpecError(f"{where} is invalid: {problems}") from e


def _explain(error: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (field path, reason), e.g. ``probeSpec.period``."""
    out = []
    for err in error.errors(include_url=False):
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                        for part in err["loc"]).removeprefix(".")
        kind, msg = err["type"], err["msg"]
        if kind == "missing":
            reason = "required field is missing"
        elif kind == "value_error":
            reason = msg.removeprefix("Value error, ")
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            reason = f"{msg[:1].lower()}{msg[1:]}, got {shown}"
        out.append((where or "(top level)", reason))
    return out

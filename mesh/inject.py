"""Proxy injection without iptables: workloads in, workloads with the proxy out.

`inject` adds to a workload's pod template (a Pod's own spec; the template of a
Deployment, ReplicaSet, ReplicationController, DaemonSet, StatefulSet or Job; a
CronJob's job template; every item of a ``List``):

- the ``meshgate-init`` init container, ``meshgate proxy init --service-cidr ...``:
  it makes the cluster's service CIDRs local in the pod's network namespace with an
  AnyIP route (mesh.redirect), which needs NET_ADMIN and so runs as root with that
  one capability, as Linkerd's proxy-init does;
- the ``meshgate-proxy`` native sidecar (in initContainers, ``restartPolicy:
  Always``, after meshgate-init): ``meshgate proxy run`` configured by environment
  variables (mesh.proxy.envconfig), its identity proven with a projected
  ServiceAccount token of audience ``identity.meshgate.io``, probed on its admin
  port, with a startup probe so the app starts once the proxy is ready;
- their two volumes, the annotations ``meshgate.io/proxy-version`` and
  ``meshgate.io/inbound-port`` (which tells the control plane the pod is meshed), and
  the pod sysctl ``net.ipv4.ip_unprivileged_port_start=0``, so that the proxy binds
  Service ports such as 80 without being root.

``config.meshgate.io/*`` annotations of the pod template tune the proxy (`ANNOTATIONS`).
`uninject` removes exactly that. Both are pure: dicts in, dicts and a `Report` per
object out; an object that is not a workload, is injected already, opts out with
``meshgate.io/inject: disabled`` or uses the host's network is returned unchanged
with a report saying why.
"""

from __future__ import annotations

import copy
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh import portlist
from mesh.config import check_identity_pattern
from mesh.discovery.index import INBOUND_PORT_ANNOTATION
from mesh.errors import ConfigError
from mesh.identity.names import DEFAULT_CONTROL_NS, SERVICE_AUDIENCE
from mesh.image import VERSION, reference
from mesh.proxy import envconfig as env

Obj = dict[str, Any]

INIT_CONTAINER = "meshgate-init"
PROXY_CONTAINER = "meshgate-proxy"
INJECT_ANNOTATION = "meshgate.io/inject"
VERSION_ANNOTATION = "meshgate.io/proxy-version"
CONFIG_PREFIX = "config.meshgate.io/"
IDENTITY_VOLUME = "meshgate-identity-end-entity"
TOKEN_VOLUME = "meshgate-identity-token"
IDENTITY_DIR = "/var/run/meshgate/identity/end-entity"
TOKEN_DIR = "/var/run/secrets/tokens"
CONTROL_SERVICE = "meshgate-control-headless"
CONTROL_PORT = 8086
INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
ADMIN_PORT = 4191
PROXY_UID = 2102
"""The proxy's user, as the control plane's (deploy/control.yaml)."""
LOG_LEVELS = ("debug", "info", "warning", "error")
UNPRIVILEGED_PORTS = "net.ipv4.ip_unprivileged_port_start"
"""Set to 0 in the pod (a safe, namespaced sysctl, as containerd 2 and Docker set it):
the proxy, non-root without capabilities, binds Service ports below 1024 (80, 443)."""

ANNOTATIONS = {
    "proxy-log-level": "the proxy's log level: debug, info, warning or error",
    "proxy-cpu-request": "the proxy's CPU request (a quantity such as 100m)",
    "proxy-cpu-limit": "the proxy's CPU limit",
    "proxy-memory-request": "the proxy's memory request (a quantity such as 64Mi)",
    "proxy-memory-limit": "the proxy's memory limit",
    "proxy-image": "the proxy's image (without a tag, this release's version is added)",
    "opaque-ports": "ports the proxy relays without protocol detection, instead of its "
                    "default list (25,587,3306,...): comma-separated numbers or ranges",
    "skip-outbound-ports": "service ports whose traffic does not go through the proxy "
                           "(meshgate-init routes them past the AnyIP route)",
    "skip-inbound-ports": "the pod's ports that callers reach directly, not through its "
                          "proxy (the control plane reads it from the pod)",
    "trusted-gateways": "identities of multicluster gateways (comma-separated; '*.' and a "
                        "suffix matches several) whose forwarded caller the proxy "
                        "authorizes and counts instead of the gateway",
}
"""The ``config.meshgate.io/<key>`` annotations a pod template may carry."""

DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "64Mi"},
                     "limits": {"cpu": "1", "memory": "256Mi"}}
INIT_RESOURCES = {"requests": {"cpu": "10m", "memory": "32Mi"},
                  "limits": {"cpu": "100m", "memory": "128Mi"}}
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_IMAGE = re.compile(r"^[a-z0-9][A-Za-z0-9._/:@-]*$")

# Where each kind keeps its pod template.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectSettings:
    """What injection needs to know of the mesh and the cluster."""

    service_cidrs: tuple[str, ...]
    trust_anchors_pem: str
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    image: str = reference()
    control_ns: str = DEFAULT_CONTROL_NS

    @property
    def control_address(self) -> str:
        """The control plane's headless Service: DNS gives its pods' addresses (a
        meshed pod's service CIDR is local to its proxy, so a ClusterIP would loop)."""
        return (f"{CONTROL_SERVICE}.{self.control_ns}.svc.{self.cluster_domain}:"
                f"{CONTROL_PORT}")


class Outcome(enum.Enum):
    INJECTED = "injected"
    UNINJECTED = "uninjected"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Report:
    """What happened to one object: ``deployment/web injected``."""

    kind: str
    name: str
    outcome: Outcome
    reason: str = ""

    def __str__(self) -> str:
        line = f"{self.kind.lower()}/{self.name} {self.outcome.value}"
        return f"{line}: {self.reason}" if self.reason else line


def inject(doc: Obj, settings: InjectSettings) -> tuple[Obj, list[Report]]:
    """`doc` with the proxy added to its pod templates (a new dict; `doc` is left
    alone), and one Report per object. ConfigError for a bad config annotation."""
    return _each(doc, lambda template: _inject_template(template, settings), Outcome.INJECTED)


def uninject(doc: Obj) -> tuple[Obj, list[Report]]:
    """`doc` without what `inject` added, and one Report per object."""
    return _each(doc, _uninject_template, Outcome.UNINJECTED)


def _each(doc: Obj, change: Callable[[Obj], str], done: Outcome) -> tuple[Obj, list[Report]]:
    out = copy.deepcopy(doc)
    reports: list[Report] = []
    _visit(out, change, done, reports)
    return out, reports


def _visit(doc: Any, change: Callable[[Obj], str], done: Outcome, reports: list[Report]) -> None:
    if not isinstance(doc, dict):
        reports.append(Report("object", "?", Outcome.SKIPPED, "not a Kubernetes object"))
        return
    kind = str(doc.get("kind") or "")
    if kind == "List" or (kind.endswith("List") and isinstance(doc.get("items"), list)):
        for item in doc.get("items") or []:
            _visit(item, change, done, reports)
        return
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or meta.get("generateName") or "?")
    path = _TEMPLATE_PATHS.get(kind)
    template = _at(doc, path) if path is not None else None
    if template is None:
        reports.append(Report(kind or "object", name, Outcome.SKIPPED, "not a workload"))
        return
    try:
        reason = change(template)
    except ConfigError as e:
        raise ConfigError(f"{kind.lower()}/{name}: {e}") from None
    reports.append(Report(kind, name, Outcome.SKIPPED, reason) if reason
                   else Report(kind, name, done))


def _at(doc: Obj, path: tuple[str, ...]) -> Obj | None:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("spec"), dict):
        return None
    return node


def _names(spec: Obj) -> list[str]:
    return [str(c.get("name")) for key in ("initContainers", "containers")
            for c in spec.get(key) or [] if isinstance(c, dict)]


# -- inject ------------------------------------------------------------------------------


def _inject_template(template: Obj, settings: InjectSettings) -> str:
    """Add the proxy to `template` in place; the reason it was left alone, or ""."""
    meta = template.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = template["spec"]
    if annotations.get(INJECT_ANNOTATION) == "disabled":
        return f"it has the annotation {INJECT_ANNOTATION}: disabled"
    if PROXY_CONTAINER in _names(spec) or INIT_CONTAINER in _names(spec):
        return f"already injected (it has a {PROXY_CONTAINER} container)"
    if spec.get("hostNetwork"):
        return "hostNetwork is enabled: the proxy would change the node's network"
    config = _read_config(annotations)
    added = {VERSION_ANNOTATION: VERSION, INBOUND_PORT_ANNOTATION: str(INBOUND_PORT)}
    if "metadata" not in template:  # first, where people write it
        rest = dict(template)
        template.clear()
        template.update({"metadata": {}, **rest})
    template["metadata"] = {**meta, "annotations": {**annotations, **added}}
    spec["initContainers"] = [_init_container(settings, config), _proxy_container(
        settings, config), *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *_volumes()]
    security = spec.setdefault("securityContext", {})
    sysctls = security.setdefault("sysctls", [])
    if not any(s.get("name") == UNPRIVILEGED_PORTS for s in sysctls):
        sysctls.append({"name": UNPRIVILEGED_PORTS, "value": "0"})
    return ""


@dataclass(frozen=True)
class _Config:
    """The proxy's settings from ``config.meshgate.io/*`` annotations."""

    log_level: str = "info"
    resources: tuple[tuple[str, str, str], ...] = ()
    """(requests|limits, cpu|memory, quantity)"""
    image: str | None = None
    opaque_ports: str | None = None
    skip_outbound_ports: str | None = None
    trusted_gateways: tuple[str, ...] = ()


def _read_config(annotations: dict[str, Any]) -> _Config:
    values = {k.removeprefix(CONFIG_PREFIX): str(v) for k, v in annotations.items()
              if k.startswith(CONFIG_PREFIX) and k.removeprefix(CONFIG_PREFIX) in ANNOTATIONS}
    level = values.get("proxy-log-level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"annotation {CONFIG_PREFIX}proxy-log-level={level!r} must be one "
                          f"of {', '.join(LOG_LEVELS)}")
    resources = []
    for res in ("cpu", "memory"):
        for kind, suffix in (("requests", "request"), ("limits", "limit")):
            key = f"proxy-{res}-{suffix}"
            if key in values:
                if not _QUANTITY.match(values[key]):
                    raise ConfigError(f"annotation {CONFIG_PREFIX}{key}={values[key]!r} is "
                                      "not a quantity such as 100m, 1 or 64Mi")
                resources.append((kind, res, values[key]))
    image = values.get("proxy-image")
    if image is not None and not _IMAGE.match(image):
        raise ConfigError(f"annotation {CONFIG_PREFIX}proxy-image={image!r} is not an image "
                          f"reference such as {reference()}")
    _ports(values, "skip-inbound-ports")  # checked here; mesh.discovery.index reads it
    return _Config(log_level=level, resources=tuple(resources), image=image,
                   opaque_ports=_ports(values, "opaque-ports"),
                   skip_outbound_ports=_ports(values, "skip-outbound-ports"),
                   trusted_gateways=_gateways(values))


def _gateways(values: dict[str, str]) -> tuple[str, ...]:
    key = "trusted-gateways"
    names = tuple(n.strip() for n in values.get(key, "").split(",") if n.strip())
    for name in names:
        try:
            check_identity_pattern(name)
        except ValueError as e:
            raise ConfigError(f"annotation {CONFIG_PREFIX}{key}={values[key]!r}: "
                              f"{e}") from None
    return names


def _ports(values: dict[str, str], key: str) -> str | None:
    """A comma-separated list of ports and ranges, checked and spelled without spaces."""
    if key not in values:
        return None
    try:
        return portlist.spelled(portlist.port_ranges(values[key]))
    except ValueError as e:
        raise ConfigError(f"annotation {CONFIG_PREFIX}{key}={values[key]!r}: {e}") from None


def _image(settings: InjectSettings, config: _Config) -> str:
    if config.image is None:
        return settings.image
    last = config.image.rsplit("/", 1)[-1]
    return config.image if ":" in last or "@" in config.image else f"{config.image}:{VERSION}"


def _init_container(settings: InjectSettings, config: _Config) -> Obj:
    args = ["proxy", "init", "--service-cidr", ",".join(settings.service_cidrs)]
    if config.skip_outbound_ports:
        args += ["--skip-outbound-ports", config.skip_outbound_ports]
    return {
        "name": INIT_CONTAINER,
        "image": _image(settings, config),
        "args": args,
        "resources": copy.deepcopy(INIT_RESOURCES),
        # Root with NET_ADMIN alone: changing routes needs the capability, and a
        # non-root process would lose it at exec without ambient capabilities.
        "securityContext": {
            "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": False, "runAsUser": 0,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}},
    }


def _proxy_container(settings: InjectSettings, config: _Config) -> Obj:
    resources = copy.deepcopy(DEFAULT_RESOURCES)
    for kind, res, value in config.resources:
        resources[kind][res] = value
    probe = {"httpGet": {"path": "/ready", "port": ADMIN_PORT}}
    return {
        "name": PROXY_CONTAINER,
        "image": _image(settings, config),
        "args": [f"--log-level={config.log_level}", "proxy", "run"],
        "restartPolicy": "Always",
        "env": _proxy_env(settings, config),
        "ports": [{"name": "meshgate-proxy", "containerPort": INBOUND_PORT},
                  {"name": "meshgate-admin", "containerPort": ADMIN_PORT}],
        "readinessProbe": {**probe, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT},
                          "initialDelaySeconds": 10, "periodSeconds": 10},
        # The app's containers start once this succeeds (a native sidecar's startup
        # probe holds the next containers back): the proxy is then ready for them.
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 120},
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR},
                         {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
    }


def _proxy_env(settings: InjectSettings, config: _Config) -> list[Obj]:
    def field(name: str, path: str) -> Obj:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    local_name = (f"$(_pod_sa).$(_pod_ns).serviceaccount.identity.{settings.control_ns}."
                  f"{settings.trust_domain}")
    out: list[Obj] = [
        field("_pod_name", "metadata.name"), field("_pod_ns", "metadata.namespace"),
        field("_pod_sa", "spec.serviceAccountName"),
        {"name": env.POD_NAME, "value": "$(_pod_name)"},
        {"name": env.POD_NAMESPACE, "value": "$(_pod_ns)"},
        {"name": env.LOCAL_NAME, "value": local_name},
        {"name": env.TRUST_ANCHORS, "value": settings.trust_anchors_pem.strip() + "\n"},
        {"name": env.IDENTITY_DIR, "value": IDENTITY_DIR},
        {"name": env.TOKEN_FILE, "value": f"{TOKEN_DIR}/{TOKEN_VOLUME}"},
        {"name": env.IDENTITY_SVC_ADDR, "value": settings.control_address},
        {"name": env.DESTINATION_SVC_ADDR, "value": settings.control_address},
        {"name": env.INBOUND_LISTEN_ADDR, "value": f"0.0.0.0:{INBOUND_PORT}"},
        {"name": env.OUTBOUND_LISTEN_ADDR, "value": f"127.0.0.1:{OUTBOUND_PORT}"},
        {"name": env.ADMIN_LISTEN_ADDR, "value": f"0.0.0.0:{ADMIN_PORT}"},
    ]
    if config.trusted_gateways:
        out.append({"name": env.INBOUND_TRUSTED_GATEWAYS,
                    "value": ",".join(config.trusted_gateways)})
    if config.opaque_ports is not None:
        out.append({"name": env.OUTBOUND_OPAQUE_PORTS,
                    "value": ",".join(map(str, portlist.ports(portlist.port_ranges(
                        config.opaque_ports))))})
    return out


def _volumes() -> list[Obj]:
    return [
        {"name": IDENTITY_VOLUME, "emptyDir": {"medium": "Memory"}},
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "path": TOKEN_VOLUME, "audience": SERVICE_AUDIENCE,
            "expirationSeconds": 86400}}]}},
    ]


# -- uninject ----------------------------------------------------------------------------


def _uninject_template(template: Obj) -> str:
    spec = template["spec"]
    if PROXY_CONTAINER not in _names(spec) and INIT_CONTAINER not in _names(spec):
        return "not injected"
    _drop(spec, "initContainers", (INIT_CONTAINER, PROXY_CONTAINER))
    _drop(spec, "volumes", (IDENTITY_VOLUME, TOKEN_VOLUME))
    # The sysctl goes too (inject added it unless the workload had it already: one
    # that set it to 0 itself loses it here, harmlessly without a proxy).
    security = spec.get("securityContext") or {}
    sysctls = [s for s in security.get("sysctls") or []
               if (s.get("name"), str(s.get("value"))) != (UNPRIVILEGED_PORTS, "0")]
    if sysctls:
        security["sysctls"] = sysctls
    else:
        security.pop("sysctls", None)
    if "securityContext" in spec and not security:
        del spec["securityContext"]
    meta = template.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    for key in (VERSION_ANNOTATION, INBOUND_PORT_ANNOTATION):
        annotations.pop(key, None)
    if "annotations" in meta and not annotations:
        del meta["annotations"]
    if "metadata" in template and not meta:
        del template["metadata"]
    return ""


def _drop(spec: Obj, key: str, names: Sequence[str]) -> None:
    kept = [item for item in spec.get(key) or [] if item.get("name") not in names]
    if kept:
        spec[key] = kept
    else:
        spec.pop(key, None)

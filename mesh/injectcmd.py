"""``meshgate inject`` and ``meshgate uninject``: mesh.inject over files and streams.

``meshgate inject FILE|DIR|-`` reads YAML (several documents) or JSON, prints the same
objects with the proxy added, in the same format, on stdout, and one line per object
on stderr (``deployment/web injected``, ``service/web skipped: not a workload``).
Everything is read and checked before anything is printed, so a bad document leaves
no half output. The mesh's settings come from the cluster of the kubeconfig, as
``meshgate install`` put them there: the trust bundle from the ConfigMap
``meshgate-identity-trust-roots`` (its anchor names the trust domain), the service
CIDRs from the cluster's ServiceCIDR objects or else the ConfigMap ``meshgate-config``
(key ``serviceCIDRs``), the cluster domain from the control plane's
``--cluster-domain``; flags override each, and with ``--service-cidr`` and
``--identity-dir`` no cluster is asked at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mesh.errors import ConfigError, MeshError
from mesh.identity.names import DEFAULT_CONTROL_NS, check_trust_domain

if TYPE_CHECKING:  # loaded by the commands, not by every `meshgate`
    from mesh.inject import InjectSettings, Obj, Report

SUFFIXES = (".yaml", ".yml", ".json")
CONFIG_MAP = "meshgate-config"
SERVICE_CIDRS_KEY = "serviceCIDRs"
CONTROL_DEPLOYMENT = "meshgate-control"


def add_inject_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]
                        ) -> None:
    cmd = commands.add_parser(
        "inject", help="add the proxy to workloads: meshgate inject FILE | kubectl apply -f -",
        description="Print the workloads of FILE, DIR (its .yaml, .yml and .json files) or - "
        "(stdin) with the meshgate-init container and the meshgate-proxy sidecar added; what "
        "was done to each object goes to stderr. Settings come from the cluster unless "
        "--service-cidr and --identity-dir are given.")
    cmd.add_argument("input", help="a file, a directory, or - for stdin")
    cmd.add_argument("--kubeconfig", type=Path,
                     help="the cluster to read the mesh's settings from (default: $KUBECONFIG "
                     "or ~/.kube/config)")
    cmd.add_argument("--service-cidr", action="append", default=[], metavar="CIDR[,CIDR]",
                     help="the cluster's service CIDR(s), made local in each pod")
    cmd.add_argument("--identity-dir", type=Path,
                     help="the directory of `meshgate identity init`: its trust bundle and "
                     "trust domain")
    cmd.add_argument("--trust-domain", help="the mesh's trust domain (default: its anchor's)")
    cmd.add_argument("--cluster-domain",
                     help="the DNS domain of Service names (default: the control plane's, "
                     "else cluster.local)")
    cmd.set_defaults(func=_inject)
    un = commands.add_parser(
        "uninject", help="remove the proxy from workloads: meshgate uninject FILE | kubectl "
        "apply -f -",
        description="Print the workloads of FILE, DIR or - without what `meshgate inject` "
        "added.")
    un.add_argument("input", help="a file, a directory, or - for stdin")
    un.set_defaults(func=_uninject)


# -- documents in and out ----------------------------------------------------------------


@dataclass(frozen=True)
class Documents:
    """What was read: the objects, and whether to answer in JSON."""

    docs: list[Any]
    json: bool


def read_input(source: str, *, stdin: Callable[[], str] = lambda: sys.stdin.read()
               ) -> Documents:
    """The documents of a file, a directory's files, or stdin (``-``)."""
    if source == "-":
        return parse(stdin(), "stdin")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise ConfigError(f"{path} holds no .yaml, .yml or .json file")
        every = [parse(_read(p), str(p)) for p in files]
        return Documents([d for one in every for d in one.docs],
                         json=all(one.json for one in every))
    return parse(_read(path), str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e


def parse(text: str, where: str) -> Documents:
    """YAML documents, or one JSON document (an object, or a List of them)."""
    is_json = text.lstrip().startswith(("{", "["))
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML or JSON: {problem}") from None
    if is_json and len(docs) == 1 and isinstance(docs[0], list):
        docs = docs[0]
    return Documents(docs, json=is_json)


def dump(documents: Documents) -> str:
    if documents.json:
        if len(documents.docs) == 1:
            return json.dumps(documents.docs[0], indent=2) + "\n"
        # Several JSON objects (a directory's, an array's) as one List kubectl applies.
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": documents.docs},
                          indent=2) + "\n"
    return yaml.safe_dump_all(documents.docs, sort_keys=False, explicit_start=True)


def _write(documents: Documents, change: Callable[[Obj], tuple[Obj, list[Report]]]
           ) -> int:
    """Change every object, then print them all and the reports (or nothing, on error)."""
    out: list[Any] = []
    reports: list[Report] = []
    for doc in documents.docs:
        if not isinstance(doc, dict):
            out.append(doc)
            continue
        changed, more = change(doc)
        out.append(changed)
        reports += more
    sys.stdout.write(dump(Documents(out, documents.json)))
    for report in reports:
        print(report, file=sys.stderr)
    return 0


def _inject(args: argparse.Namespace) -> int:
    from mesh.inject import inject

    documents = read_input(args.input)  # a bad input fails before the cluster is asked
    settings = settings_from(args)
    return _write(documents, lambda doc: inject(doc, settings))


def _uninject(args: argparse.Namespace) -> int:
    from mesh.inject import uninject

    return _write(read_input(args.input), uninject)


# -- settings ----------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> InjectSettings:
    """The flags' settings, completed from the cluster when some are missing."""
    return settings(args.kubeconfig, service_cidrs=args.service_cidr,
                    identity_dir=args.identity_dir, trust_domain=args.trust_domain,
                    cluster_domain=args.cluster_domain)


def settings(kubeconfig: Path | None, *, service_cidrs: Sequence[str] = (),
             identity_dir: Path | None = None, trust_domain: str | None = None,
             cluster_domain: str | None = None) -> InjectSettings:
    """The settings given, the others read from the cluster of `kubeconfig`."""
    from mesh.inject import InjectSettings

    cidrs = [c.strip() for flag in service_cidrs for c in flag.split(",") if c.strip()]
    bundle_pem: str | None = None
    if identity_dir is not None:
        bundle_pem = _identity_dir_bundle(identity_dir)
    if not cidrs or bundle_pem is None:
        cluster = ClusterSettings.from_kubeconfig(kubeconfig)
        if bundle_pem is None:
            bundle_pem = cluster.trust_bundle()
        if not cidrs:
            cidrs = cluster.service_cidrs()
        if cluster_domain is None:
            cluster_domain = cluster.cluster_domain()
    cluster_domain = cluster_domain or "cluster.local"
    trust_domain = trust_domain or _trust_domain(bundle_pem)
    try:
        check_trust_domain(trust_domain)
    except MeshError as e:
        raise ConfigError(f"--trust-domain: {e}") from None
    for cidr in cidrs:
        _check_cidr(cidr)
    return InjectSettings(service_cidrs=tuple(cidrs), trust_anchors_pem=bundle_pem,
                          trust_domain=trust_domain, cluster_domain=cluster_domain)


def _check_cidr(cidr: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_network(cidr)
    except ValueError as e:
        raise ConfigError(f"service CIDR {cidr!r} is not a CIDR such as 10.96.0.0/16: "
                          f"{e}") from None


def _identity_dir_bundle(path: Path) -> str:
    from mesh.identity.ca import IssuerDir

    if not path.is_dir():
        raise ConfigError(f"identity directory {path} does not exist; create it with "
                          "`meshgate identity init`")
    return IssuerDir(path).load_bundle().to_pem().decode("ascii")


def _trust_domain(pem: str) -> str:
    from mesh.identity import ca
    from mesh.identity.bundle import TrustBundle

    for anchor in TrustBundle.from_pem(pem.encode()).anchors:
        if domain := ca.anchor_trust_domain(anchor):
            return domain
    raise ConfigError("no trust anchor of the trust bundle names a trust domain; give "
                      "--trust-domain")


class ClusterSettings:
    """The mesh's settings as the cluster holds them (read through the kubernetes client;
    calls block)."""

    def __init__(self, api: Any, *, hint: str = "") -> None:
        from kubernetes import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.hint = hint

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path | None) -> ClusterSettings:
        from kubernetes import config
        from kubernetes.config.config_exception import ConfigException

        hint = "give --service-cidr and --identity-dir to inject without a cluster"
        try:
            if kubeconfig is not None:
                from mesh.kube import api_client

                api = api_client(kubeconfig)
            else:
                api = config.new_client_from_config()
        except (ConfigException, OSError, ConfigError) as e:
            raise ConfigError(f"no cluster to read the mesh's settings from ({e}); "
                              f"{hint}") from None
        return cls(api, hint=f"; {hint}")

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        """`call`'s answer; None for 404; a ConfigError when the cluster is away."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except ApiException as e:
            if e.status == 404:
                return None
            raise ConfigError(f"cannot read {what}: {e.status} {e.reason}") from None
        except (HTTPError, OSError) as e:
            raise ConfigError(f"cannot reach the cluster to read {what} ({e})"
                              f"{self.hint}") from None

    def trust_bundle(self) -> str:
        from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY

        cm = self._call(f"ConfigMap {DEFAULT_CONTROL_NS}/{TRUST_ROOTS_CONFIGMAP}",
                        lambda: self.core.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP,
                                                                     DEFAULT_CONTROL_NS))
        pem = (cm.data or {}).get(TRUST_ROOTS_KEY) if cm is not None else None
        if not pem:
            raise ConfigError(f"the cluster has no trust bundle (ConfigMap {DEFAULT_CONTROL_NS}/"
                              f"{TRUST_ROOTS_CONFIGMAP}, key {TRUST_ROOTS_KEY}): install "
                              "meshgate first (`meshgate install`), or give --identity-dir")
        return str(pem)

    def service_cidrs(self) -> list[str]:
        from kubernetes import client

        served = self._call("ServiceCIDRs", lambda: client.NetworkingV1Api(
            self.api).list_service_cidr())
        cidrs = [c for item in (served.items if served is not None else [])
                 for c in (item.spec.cidrs or [])]
        if cidrs:
            return sorted(set(cidrs), key=cidrs.index)
        cm = self._call(f"ConfigMap {DEFAULT_CONTROL_NS}/{CONFIG_MAP}",
                        lambda: self.core.read_namespaced_config_map(CONFIG_MAP,
                                                                     DEFAULT_CONTROL_NS))
        value = (cm.data or {}).get(SERVICE_CIDRS_KEY, "") if cm is not None else ""
        cidrs = [c.strip() for c in value.split(",") if c.strip()]
        if not cidrs:
            raise ConfigError("the cluster serves no ServiceCIDR and has no "
                              f"{SERVICE_CIDRS_KEY} in ConfigMap {DEFAULT_CONTROL_NS}/"
                              f"{CONFIG_MAP}; give --service-cidr (the cluster's service "
                              "range, such as 10.96.0.0/12)")
        return cidrs

    def cluster_domain(self) -> str:
        from kubernetes import client

        deployment = self._call(
            f"Deployment {DEFAULT_CONTROL_NS}/{CONTROL_DEPLOYMENT}",
            lambda: client.AppsV1Api(self.api).read_namespaced_deployment(
                CONTROL_DEPLOYMENT, DEFAULT_CONTROL_NS))
        containers = deployment.spec.template.spec.containers if deployment else []
        for container in containers:
            for arg in container.args or []:
                if arg.startswith("--cluster-domain="):
                    return str(arg.partition("=")[2])
        return "cluster.local"

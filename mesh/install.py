"""``meshgate install`` and ``meshgate uninstall``: meshgate's manifests for a real
cluster, printed for ``kubectl apply -f -`` / ``kubectl delete -f -``.

As ``linkerd install``, in two steps: ``install --crds`` prints the
CustomResourceDefinitions (deploy/crds), then ``install --identity-dir DIR`` the rest
(deploy/, and with ``--ha`` deploy/ha) plus the two objects made from the operator's
identity directory: the issuer Secret (the issuer's certificate and key, the trust
anchor's certificate; never the anchor's key) and the trust roots ConfigMap. The
manifests are built from deploy/'s files (`mesh.manifests`); ``--set`` changes a
documented few fields of them (`SET_KEYS`).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mesh import manifests
from mesh.errors import ConfigError
from mesh.identity import ca
from mesh.identity.ca import IssuerDir
from mesh.identity.names import DEFAULT_CONTROL_NS
from mesh.image import IMAGE, reference
from mesh.manifests import Obj

ISSUER_SECRET = "meshgate-identity-issuer"
CONFIG_MAP = "meshgate-config"
SERVICE_CIDRS_KEY = "serviceCIDRs"
"""meshgate-config's key for the service range(s), comma-separated; empty: read the
cluster's networking.k8s.io/v1 ServiceCIDR objects."""
BASE_TRUST_DOMAIN = "cluster.local"
"""The trust domain deploy/'s files name; install renders the identity directory's."""
COMPONENTS = {"control": "meshgate-control", "gateway": "meshgate-gateway",
              "mirror": "meshgate-mirror"}
"""``--set`` component names and their Deployments."""
SCALED = ("meshgate-control", "meshgate-gateway")
"""The Deployments ``replicas`` (and ``--ha``) scale; the mirror controller stays at one."""
LOGGED = ("meshgate-control", "meshgate-gateway")
"""The Deployments whose ``meshgate --log-level`` ``logLevel`` sets."""
LOG_LEVELS = ("debug", "info", "warning", "error")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_IMAGE = re.compile(r"^[a-z0-9][A-Za-z0-9._/:@-]*$")
SET_KEYS = ("image", "replicas", "logLevel",
            *(f"{c}.resources.{kind}.{res}" for c in COMPONENTS
              for kind in ("requests", "limits") for res in ("cpu", "memory")))
"""What ``--set key=value`` accepts:

- ``image``: the image of every container (default `mesh.image.reference()`);
- ``replicas``: the control plane's and the gateway's replicas (``--ha``: 2);
- ``logLevel``: debug, info, warning or error, for the control plane and the gateway;
- ``<control|gateway|mirror>.resources.<requests|limits>.<cpu|memory>``: a quantity.
"""


def add_install_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]
                         ) -> None:
    install = commands.add_parser(
        "install", help="print meshgate's manifests for kubectl apply -f -",
        description="Print meshgate's manifests: first `meshgate install --crds | kubectl "
        "apply -f -`, then `meshgate install --identity-dir DIR | kubectl apply -f -`.")
    install.add_argument("--crds", action="store_true",
                         help="print only the CustomResourceDefinitions (apply them first)")
    install.add_argument("--identity-dir", type=Path,
                         help="the directory of `meshgate identity init`: its issuer and "
                         "trust bundle go into the cluster (its anchor key does not)")
    install.add_argument("--ha", action="store_true",
                         help="two replicas of the control plane and the gateway, with "
                         "PodDisruptionBudgets")
    install.add_argument("--service-cidr", type=_service_cidrs, default=(),
                         metavar="CIDR[,CIDR]",
                         help="the cluster's service range(s), for clusters that serve no "
                         "networking.k8s.io/v1 ServiceCIDR (kube before 1.33)")
    install.add_argument("--set", dest="values", action="append", default=[],
                         metavar="KEY=VALUE", type=_key_value,
                         help=f"change a field; keys: {', '.join(SET_KEYS[:3])}, "
                         "<control|gateway|mirror>.resources.<requests|limits>.<cpu|memory>")
    install.set_defaults(func=_install)
    uninstall = commands.add_parser(
        "uninstall", help="print what to delete, for kubectl delete -f -",
        description="Print every object `meshgate install` renders, in the order "
        "kubectl delete should remove them: `meshgate uninstall | kubectl delete -f -`.")
    uninstall.add_argument("--crds", action="store_true",
                           help="also the CustomResourceDefinitions, last (this deletes "
                           "every Link, policy and ExternalWorkload)")
    uninstall.set_defaults(func=_uninstall)


def _service_cidrs(value: str) -> tuple[str, ...]:
    out = []
    for part in value.split(","):
        try:
            out.append(str(ipaddress.ip_network(part.strip())))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a CIDR such as "
                                             f"10.96.0.0/12: {e}") from None
    if len(out) > 2 or len({ipaddress.ip_network(c).version for c in out}) != len(out):
        raise argparse.ArgumentTypeError(f"{value!r}: at most one IPv4 and one IPv6 range")
    return tuple(out)


def _key_value(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE, such as replicas=2")
    return key, val


def _install(args: argparse.Namespace) -> int:
    if args.crds:
        if args.identity_dir or args.ha or args.values or args.service_cidr:
            raise ConfigError("--crds prints only the CustomResourceDefinitions; give "
                              "--identity-dir, --ha, --service-cidr and --set to the second "
                              "install")
        docs = manifests.build(manifests.CRDS)
    else:
        if args.identity_dir is None:
            raise ConfigError(
                "install needs --identity-dir DIR: the issuer that signs the mesh's "
                "certificates goes into the cluster as a Secret, and its trust bundle as a "
                "ConfigMap. Create one with `meshgate identity init --trust-domain "
                "cluster.local --out DIR` (then keep DIR/anchor.key offline), or render "
                "the CRDs alone with --crds")
        docs = render(IssuerDir(args.identity_dir), ha=args.ha, values=args.values,
                      service_cidrs=args.service_cidr)
    sys.stdout.write(manifests.dump(docs))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    docs = [_reference(doc) for doc in reversed(manifests.build(manifests.BASE))]
    docs.insert(len(docs) - 1, _reference(_trust_roots("")))  # before the Namespace
    docs.insert(len(docs) - 1, _reference(_issuer_secret(b"", b"", b"")))
    if args.crds:
        docs += [_reference(doc) for doc in manifests.build(manifests.CRDS)]
    sys.stdout.write(manifests.dump(docs))
    return 0


def _reference(doc: Obj) -> Obj:
    meta = {k: v for k, v in doc["metadata"].items() if k in ("name", "namespace")}
    return {"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": meta}


def render(identity: IssuerDir, *, ha: bool = False,
           values: list[tuple[str, str]] | None = None,
           service_cidrs: tuple[str, ...] = ()) -> list[Obj]:
    """Every object but the CRDs: deploy/ (and deploy/ha), for the identity directory's
    trust domain, with its issuer Secret and trust roots ConfigMap after the Namespace,
    and ``service_cidrs`` (if any) in the ConfigMap meshgate-config."""
    trust_domain, secret, roots = _identity_objects(identity)
    docs = manifests.build(manifests.BASE, components=(manifests.HA,) if ha else ())
    for doc in docs:  # this release's image (deploy/kustomization.yaml names the same)
        for container in manifests.containers(doc):
            if container["image"].partition(":")[0] == IMAGE:
                container["image"] = reference()
    _set_trust_domain(docs, trust_domain)
    for doc in docs:  # the injector's certificate chains to the trust bundle
        if doc["kind"] == "MutatingWebhookConfiguration":
            for hook in doc["webhooks"]:
                hook["clientConfig"]["caBundle"] = base64.b64encode(
                    roots["data"]["ca-bundle.crt"].encode()).decode("ascii")
    namespace = next(i for i, doc in enumerate(docs) if doc["kind"] == "Namespace")
    docs[namespace + 1:namespace + 1] = [secret, roots]
    for doc in docs:
        if service_cidrs and doc["kind"] == "ConfigMap" and \
                doc["metadata"]["name"] == CONFIG_MAP:
            doc["data"][SERVICE_CIDRS_KEY] = ",".join(service_cidrs)
    for key, value in values or []:
        _setter(key)(docs, value)
    return docs


def _identity_objects(identity: IssuerDir) -> tuple[str, Obj, Obj]:
    if not identity.path.is_dir():
        raise ConfigError(f"identity directory {identity.path} does not exist; create it "
                          f"with `meshgate identity init --trust-domain cluster.local --out "
                          f"{identity.path}`")
    anchor = identity.load_anchor_cert()  # the anchor's certificate only, never its key
    trust_domain = ca.anchor_trust_domain(anchor)
    if not trust_domain:
        raise ConfigError(f"{identity.anchor_cert} does not name a trust domain; recreate "
                          "it with `meshgate identity init`")
    identity.load_issuer()  # its key matches and it chains to the bundle
    secret = _issuer_secret(identity.issuer_cert.read_bytes(),
                            identity.issuer_key.read_bytes(),
                            identity.anchor_cert.read_bytes())
    roots = _trust_roots(identity.load_bundle().to_pem().decode("ascii"))
    return trust_domain, secret, roots


def _issuer_secret(cert: bytes, key: bytes, anchor: bytes) -> Obj:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": ISSUER_SECRET, "namespace": DEFAULT_CONTROL_NS,
                         "labels": {"app.kubernetes.io/part-of": "meshgate"}},
            "data": {"tls.crt": b64(cert), "tls.key": b64(key), "ca.crt": b64(anchor)}}


def _trust_roots(pem: str) -> Obj:
    # As mesh.identity.trustroots.publish writes it, so the control plane finds it equal.
    # (Imported here: it loads the kubernetes client, which `meshgate proxy` must not.)
    from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY

    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "namespace": DEFAULT_CONTROL_NS,
                         "labels": {"app.kubernetes.io/part-of": "meshgate"}},
            "data": {TRUST_ROOTS_KEY: pem}}


def _set_trust_domain(docs: list[Obj], trust_domain: str) -> None:
    if trust_domain == BASE_TRUST_DOMAIN:
        return
    old = f"identity.{DEFAULT_CONTROL_NS}.{BASE_TRUST_DOMAIN}"
    new = f"identity.{DEFAULT_CONTROL_NS}.{trust_domain}"
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "meshgate-gateway-config":
            doc["data"]["gateway.yaml"] = doc["data"]["gateway.yaml"].replace(old, new)
        for container in manifests.containers(doc):
            container["args"] = [f"--trust-domain={trust_domain}"
                                 if arg == f"--trust-domain={BASE_TRUST_DOMAIN}" else arg
                                 for arg in container.get("args") or []]


# -- --set -----------------------------------------------------------------------------

Setter = Callable[[list[Obj], str], None]


def _setter(key: str) -> Setter:
    if key == "image":
        return _set_image
    if key == "replicas":
        return _set_replicas
    if key == "logLevel":
        return _set_log_level
    parts = key.split(".")
    if key in SET_KEYS and len(parts) == 4:
        return lambda docs, value: _set_resource(docs, COMPONENTS[parts[0]], parts[2],
                                                 parts[3], value)
    raise ConfigError(f"unknown --set key {key!r}; the keys are image, replicas, logLevel "
                      "and <control|gateway|mirror>.resources.<requests|limits>.<cpu|memory>")


def _deployments(docs: list[Obj], names: tuple[str, ...]) -> list[Obj]:
    return [doc for doc in docs
            if doc["kind"] == "Deployment" and doc["metadata"]["name"] in names]


def _set_image(docs: list[Obj], value: str) -> None:
    if not _IMAGE.match(value):
        raise ConfigError(f"--set image={value!r} is not an image reference such as "
                          f"{reference()}")
    for doc in docs:
        for container in manifests.containers(doc):
            container["image"] = value


def _set_replicas(docs: list[Obj], value: str) -> None:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"--set replicas={value!r} must be a whole number of at least 1")
    for doc in _deployments(docs, SCALED):
        doc["spec"]["replicas"] = int(value)


def _set_log_level(docs: list[Obj], value: str) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError(f"--set logLevel={value!r} must be one of {', '.join(LOG_LEVELS)}")
    for doc in _deployments(docs, LOGGED):
        for container in manifests.containers(doc):
            container["args"] = [f"--log-level={value}" if arg.startswith("--log-level=")
                                 else arg for arg in container.get("args") or []]


def _set_resource(docs: list[Obj], deployment: str, kind: str, resource: str,
                  value: str) -> None:
    if not _QUANTITY.match(value):
        raise ConfigError(f"--set {resource}={value!r} is not a quantity such as 250m, 1 or "
                          "512Mi")
    for doc in _deployments(docs, (deployment,)):
        for container in manifests.containers(doc):
            container.setdefault("resources", {}).setdefault(kind, {})[resource] = value

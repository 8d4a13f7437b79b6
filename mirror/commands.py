"""`meshgate multicluster link` and `unlink`, and the parsers of `gateways` and
`check` (`mirror.gateways`, `mirror.check`) and of `meshgate failover status`
(`mirror.failover`).

`link`, run against the EXPORTING cluster, creates there a ServiceAccount whose
only rights are to read Services and EndpointSlices (a ClusterRole and its
binding) and the ConfigMap holding the cluster's trust bundle (a Role), waits
for its token, and prints two documents for the IMPORTING cluster: a Secret
(type ``mirror.meshgate.io/remote-kubeconfig``) holding a kubeconfig with that
token, and the Link that uses it. Apply them with ``kubectl apply -f -`` in the
importing cluster.

`unlink`, run against the IMPORTING cluster, removes a Link's mirrors and
their EndpointSlices, the Link (with its finalizer) and its credentials.
Everything it does can be done again: a second run finds nothing to do.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import yaml

from mesh.errors import ConfigError, MeshError
from mesh.identity.names import GATEWAY_SERVICE_ACCOUNT, Identity
from mirror.apiaddress import ApiServer
from mirror.gatewayservice import GatewayAddress

# mirror.link and mirror.mirrors are imported where they are used: `meshgate` builds
# this command's parser for every sub-command, the proxy's included, which must not
# load the kubernetes client.

READER = "meshgate-mirror-reader"
"""The ServiceAccount, ClusterRole and binding that linked clusters read through."""
TOKEN_WAIT = 10.0


class LinkError(MeshError):
    """A link cannot be made or removed as asked."""


def add_multicluster_commands(commands: Any) -> None:
    mc = commands.add_parser("multicluster", help="link clusters")
    sub = mc.add_subparsers(dest="multicluster_command", required=True)

    link = sub.add_parser("link", help="print a Link and its credentials for another "
                          "cluster to import this one's exported Services")
    link.add_argument("--kubeconfig", required=True, type=Path,
                      help="the EXPORTING cluster (the one being linked to)")
    link.add_argument("--cluster-name", required=True,
                      help="the name the importing cluster will know it by")
    link.add_argument("--gateway-address",
                      help="its gateway's addresses (names or IPs, comma separated); "
                      "default: read from its gateway Service meshgate/meshgate-gateway "
                      "(load-balancer ingress, externalIPs, or node addresses and ports)")
    link.add_argument("--gateway-port", type=int,
                      help="with --gateway-address (default 4143)")
    link.add_argument("--probe-port", type=int, help="with --gateway-address (default 4191)")
    link.add_argument("--api-server",
                      help="the API server address the importing cluster reaches (default: "
                      "the kubeconfig's)")
    link.add_argument("--trust-domain", default="cluster.local")
    link.add_argument("--cluster-domain", default="cluster.local")
    link.add_argument("--namespace", default="meshgate",
                      help="where the Link and Secret go in the importing cluster")
    link.set_defaults(func=_link)

    unlink = sub.add_parser("unlink", help="remove a Link, its mirrors and credentials")
    unlink.add_argument("--kubeconfig", required=True, type=Path,
                        help="the IMPORTING cluster")
    unlink.add_argument("--cluster-name", required=True)
    unlink.add_argument("--namespace", default="meshgate")
    unlink.set_defaults(func=_unlink)

    gateways = sub.add_parser("gateways", help="one line per linked cluster: gateway alive, "
                              "probe latency, mirrored Services")
    _importing_kubeconfig(gateways)
    gateways.add_argument("--namespace", default="meshgate", help="namespace of the Links")
    gateways.set_defaults(func=_gateways)

    check = sub.add_parser("check", help="check the Links, their credentials, gateways and "
                           "mirrors; exit status 1 when anything is wrong")
    _importing_kubeconfig(check)
    check.add_argument("--namespace", default="meshgate", help="namespace of the Links")
    check.set_defaults(func=_check)


def add_failover_commands(commands: Any) -> None:
    fo = commands.add_parser("failover", help="Services that fail over to linked clusters")
    sub = fo.add_subparsers(dest="failover_command", required=True)
    status = sub.add_parser("status", help="each failover Service's priority groups, their "
                            "health and which serves; exit status 1 when one has no healthy "
                            "group")
    _importing_kubeconfig(status)
    status.add_argument("--service", metavar="NS/NAME", help="only this Service")
    status.add_argument("--cluster-name",
                        help="this cluster's name, as its control plane's --cluster-name "
                        "(default: the cluster of the kubeconfig's current context)")
    status.set_defaults(func=_failover_status)


def _failover_status(args: argparse.Namespace) -> int:
    from mirror.failover import run_status

    if args.service is not None and (args.service.count("/") != 1 or
                                     not all(args.service.split("/"))):
        raise LinkError(f"--service {args.service!r} is not NAMESPACE/NAME, such as "
                        "default/web")
    return run_status(args)


def _importing_kubeconfig(parser: argparse.ArgumentParser) -> None:
    """--kubeconfig of the importing cluster, by default $KUBECONFIG as kubectl does (so
    `meshgate cluster exec --name east -- meshgate multicluster check` needs no more)."""
    default = os.environ.get("KUBECONFIG")
    parser.add_argument("--kubeconfig", type=Path, required=default is None,
                        default=Path(default) if default else None,
                        help="the IMPORTING cluster (default: $KUBECONFIG)")


def _gateways(args: argparse.Namespace) -> int:
    from mirror.gateways import run_gateways

    return run_gateways(args)


def _check(args: argparse.Namespace) -> int:
    from mirror.check import run_check

    return run_check(args)


def _link(args: argparse.Namespace) -> int:
    from kubernetes import client

    from mesh.kube import api_client
    from mirror.link import API_VERSION, CREDENTIALS_SECRET_KEY, CREDENTIALS_SECRET_TYPE, KIND

    with api_client(args.kubeconfig) as api:
        gateway = _gateway(args, client.CoreV1Api(api))
        token = _reader_token(client.CoreV1Api(api), client.RbacAuthorizationV1Api(api))
        server = args.api_server or _api_server(api.configuration.host,
                                                client.CoreV1Api(api)).url
        ca_path = api.configuration.ssl_ca_cert
    ca = Path(ca_path).read_bytes() if ca_path else None
    secret_name = f"cluster-credentials-{args.cluster_name}"
    docs = [
        {"apiVersion": "v1", "kind": "Secret", "type": CREDENTIALS_SECRET_TYPE,
         "metadata": {"name": secret_name, "namespace": args.namespace},
         "data": {CREDENTIALS_SECRET_KEY: base64.b64encode(
             _kubeconfig(args.cluster_name, server, ca, token).encode()).decode()}},
        {"apiVersion": API_VERSION, "kind": KIND,
         "metadata": {"name": args.cluster_name, "namespace": args.namespace},
         "spec": {
             "targetClusterName": args.cluster_name,
             "targetClusterDomain": args.cluster_domain,
             "clusterCredentialsSecret": secret_name,
             "gatewayAddress": ",".join(gateway.addresses),
             "gatewayPort": gateway.port,
             "gatewayIdentity": Identity("meshgate", GATEWAY_SERVICE_ACCOUNT,
                                         args.trust_domain).dns_name,
             "probeSpec": {"path": "/ready", "port": gateway.probe_port, "period": "3s"}}},
    ]
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def _api_server(kubeconfig_server: str, core: Any) -> ApiServer:
    """The kubeconfig's server, or kube-public/cluster-info's when that is loopback."""
    from kubernetes.client.rest import ApiException

    from mirror.apiaddress import api_server, is_loopback

    info = None
    if is_loopback(kubeconfig_server):
        with contextlib.suppress(ApiException):  # none, or not readable: say so below
            info = core.read_namespaced_config_map("cluster-info", "kube-public").data
    chosen = api_server(kubeconfig_server, info)
    if chosen.warning:
        print(f"warning: {chosen.warning}", file=sys.stderr)
    return chosen


def _gateway(args: argparse.Namespace, core: Any) -> GatewayAddress:
    """The exporting cluster's gateway: as given, or read from its gateway Service."""
    from kubernetes.client.rest import ApiException

    from mirror import gatewayservice

    if args.gateway_address:
        return GatewayAddress(tuple(a.strip() for a in args.gateway_address.split(",")),
                              args.gateway_port or 4143, args.probe_port or 4191,
                              "--gateway-address")
    if args.gateway_port or args.probe_port:
        raise ConfigError("--gateway-port and --probe-port go with --gateway-address; "
                          "without it the ports are read from the gateway Service")
    try:
        service = core.api_client.sanitize_for_serialization(core.read_namespaced_service(
            gatewayservice.NAME, gatewayservice.NAMESPACE))
    except ApiException as e:
        if e.status == 404:
            raise gatewayservice.NoGatewayAddress(
                f"the exporting cluster has no gateway Service {gatewayservice.NAMESPACE}/"
                f"{gatewayservice.NAME}: install its gateway (cluster up --multicluster on "
                "an embedded cluster), or give --gateway-address") from None
        raise
    nodes: list[dict[str, Any]] = []
    if not ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") and \
            not (service.get("spec") or {}).get("externalIPs"):
        with contextlib.suppress(ApiException):  # a server without Nodes has none to offer
            nodes = core.api_client.sanitize_for_serialization(core.list_node())["items"]
    found = gatewayservice.gateway_address(service, nodes)
    print(f"# gateway {','.join(found.addresses)}:{found.port} (probe port "
          f"{found.probe_port}), from {found.source} of {gatewayservice.NAMESPACE}/"
          f"{gatewayservice.NAME}", file=sys.stderr)
    return found


def _reader_token(core: Any, rbac: Any) -> str:
    """The token of the read-only ServiceAccount, creating what is missing."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP

    def ensure(create: Any, *args: Any) -> None:
        try:
            create(*args)
        except ApiException as e:
            if e.status != 409:
                raise LinkError(f"cannot prepare the link credential in the exporting "
                                f"cluster: {e.status} {e.reason}") from e

    meta = client.V1ObjectMeta
    ensure(core.create_namespace, client.V1Namespace(metadata=meta(name="meshgate")))
    ensure(core.create_namespaced_service_account, "meshgate",
           client.V1ServiceAccount(metadata=meta(name=READER)))
    ensure(rbac.create_cluster_role, client.V1ClusterRole(
        metadata=meta(name=READER),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["services"],
                                   verbs=["get", "list", "watch"]),
               client.V1PolicyRule(api_groups=["discovery.k8s.io"],
                                   resources=["endpointslices"],
                                   verbs=["get", "list", "watch"])]))
    ensure(rbac.create_cluster_role_binding, client.V1ClusterRoleBinding(
        metadata=meta(name=READER),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                  name=READER),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=READER,
                                       namespace="meshgate")]))
    # One more right, on one object: reading the trust bundle the cluster publishes, so
    # that `multicluster check` can tell whether the two clusters share an anchor.
    ensure(rbac.create_namespaced_role, "meshgate", client.V1Role(
        metadata=meta(name=READER),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get"],
                                   resource_names=[TRUST_ROOTS_CONFIGMAP])]))
    ensure(rbac.create_namespaced_role_binding, "meshgate", client.V1RoleBinding(
        metadata=meta(name=READER),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                  name=READER),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=READER,
                                       namespace="meshgate")]))
    ensure(core.create_namespaced_secret, "meshgate", client.V1Secret(
        metadata=meta(name=f"{READER}-token",
                      annotations={"kubernetes.io/service-account.name": READER}),
        type="kubernetes.io/service-account-token"))
    deadline = time.monotonic() + TOKEN_WAIT
    while time.monotonic() < deadline:
        secret = core.read_namespaced_secret(f"{READER}-token", "meshgate")
        token = (secret.data or {}).get("token")
        if token:
            return base64.b64decode(token).decode()
        time.sleep(0.1)
    raise LinkError(f"the exporting cluster did not fill in the token of Secret "
                    f"meshgate/{READER}-token within {TOKEN_WAIT:g}s; is its token "
                    "controller running?")


def _kubeconfig(cluster: str, server: str, ca: bytes | None, token: str) -> str:
    entry: dict[str, Any] = {"server": server}
    if ca:
        entry["certificate-authority-data"] = base64.b64encode(ca).decode()
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": cluster, "cluster": entry}],
        "users": [{"name": READER, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": READER}}],
        "current-context": cluster}, sort_keys=False)


def _unlink(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from mesh.kube import MERGE_PATCH, api_client
    from mirror.link import FINALIZER, GROUP, PLURAL, VERSION
    from mirror.mirrors import CLUSTER_LABEL, MIRRORED_LABEL, SERVICE_NAME_LABEL

    removed: list[str] = []
    with api_client(args.kubeconfig) as api:
        core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        custom = client.CustomObjectsApi(api)
        link: dict[str, Any] | None
        try:
            link = cast(dict[str, Any], custom.get_namespaced_custom_object(
                GROUP, VERSION, args.namespace, PLURAL, args.cluster_name))
        except ApiException as e:
            if e.status != 404:
                raise LinkError(f"cannot read Link {args.namespace}/{args.cluster_name}: "
                                f"{e.status} {e.reason}") from e
            link = None
        selector = f"{MIRRORED_LABEL}=true,{CLUSTER_LABEL}={args.cluster_name}"
        mirrors = _items(core.list_service_for_all_namespaces(
            label_selector=selector, _preload_content=False))
        for svc in mirrors:
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            slices = _items(disc.list_namespaced_endpoint_slice(
                ns, label_selector=f"{SERVICE_NAME_LABEL}={name}", _preload_content=False))
            for piece in slices:
                with contextlib.suppress(ApiException):
                    disc.delete_namespaced_endpoint_slice(piece["metadata"]["name"], ns)
            with contextlib.suppress(ApiException):
                core.delete_namespaced_service(name, ns)
                removed.append(f"service {ns}/{name}")
        if link is not None:
            secret = (link.get("spec") or {}).get("clusterCredentialsSecret")
            finalizers = [f for f in link["metadata"].get("finalizers") or []
                          if f != FINALIZER]
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, args.namespace, PLURAL, args.cluster_name,
                    {"metadata": {"finalizers": finalizers}}, _content_type=MERGE_PATCH)
            with contextlib.suppress(ApiException):
                custom.delete_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL,
                                                       args.cluster_name)
                removed.append(f"link {args.namespace}/{args.cluster_name}")
            if secret:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_secret(secret, args.namespace)
                    removed.append(f"secret {args.namespace}/{secret}")
    if not removed:
        print(f"nothing to unlink: no Link {args.namespace}/{args.cluster_name} and no "
              "mirrors of that cluster")
    for line in removed:
        print(f"removed {line}")
    return 0


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a list call made with ``_preload_content=False``, as dicts."""
    return list(json.loads(response.data)["items"])

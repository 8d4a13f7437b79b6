"""``meshgate vm token``: everything the operator's side prepares for one VM.

For ExternalWorkload NAME in namespace NS, run as SERVICE-ACCOUNT, it makes
(each step idempotent, so running it again mints a new token and changes
nothing else):

- the ExternalWorkload itself: its identity, labels and ports (the VM fills in
  its address when it joins);
- the agent's credential: ServiceAccount ``meshgate-vm-NAME``, a Role allowing
  get, update and patch of ``externalworkloads/NAME`` and its status and
  nothing else (RBAC ``resourceNames``), its RoleBinding, and a ServiceAccount
  token Secret that the join token hands to the VM once;
- the single-use join token (mesh.identity.jointoken);

and prints the exact ``meshgate vm join`` command line to run on the VM.
"""

from __future__ import annotations

import argparse
import base64
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.control.externalworkloads import GROUP, KIND, PLURAL, VERSION
from mesh.errors import ConfigError
from mesh.identity import ca, jointoken
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY
from mesh.kube import api_client

CREDENTIAL_PREFIX = "meshgate-vm-"
TOKEN_WAIT = 10.0


def credential_name(workload: str) -> str:
    return f"{CREDENTIAL_PREFIX}{workload}"


def run(args: argparse.Namespace) -> int:
    api = api_client(args.kubeconfig)
    core = client.CoreV1Api(api)
    try:
        core.read_namespaced_service_account(args.service_account, args.namespace)
    except ApiException as e:
        if e.status == 404:
            raise ConfigError(f"ServiceAccount {args.namespace}/{args.service_account} does "
                              "not exist; create it first (kubectl create serviceaccount)"
                              ) from e
        raise ConfigError(f"the cluster refused: {e.status} {e.reason}") from e
    try:
        bundle_pem = _published_bundle(core, args.control_namespace)
        trust_domain = args.trust_domain or _domain_of(bundle_pem)
        identity = Identity(args.namespace, args.service_account, trust_domain,
                            args.control_namespace)
        apply_workload(api, namespace=args.namespace, name=args.workload, identity=identity,
                       labels=dict(args.label), ports=list(args.port))
        secret = prepare_credential(api, namespace=args.namespace, workload=args.workload)
        server = args.api_server or api.configuration.host
        token, expires = jointoken.mint(
            core, namespace=args.namespace, workload=args.workload,
            service_account=args.service_account, ttl=args.ttl,
            agent=jointoken.AgentCredential(secret, server, _ca_pem(api)))
    except ApiException as e:
        raise ConfigError(f"the cluster refused: {e.status} {e.reason}: "
                          f"{(e.body or '')[:300]}") from e
    anchor = "trust-bundle.pem"
    if args.trust_anchor_out is not None:
        if not bundle_pem:
            raise ConfigError("the control plane has not published its trust bundle "
                              f"(ConfigMap {args.control_namespace}/{TRUST_ROOTS_CONFIGMAP}); "
                              "copy trust-bundle.pem from the identity directory instead")
        args.trust_anchor_out.write_text(bundle_pem)
        anchor = str(args.trust_anchor_out)
    line = ["meshgate", "vm", "join", "--token", token, "--control-plane",
            args.control_plane, "--trust-anchor", anchor]
    if args.gateway:
        line += ["--gateway", args.gateway]
    print(shlex.join(line))
    print(f"ExternalWorkload {args.namespace}/{args.workload} is {identity}; the token is "
          f"single use, valid until {expires:%Y-%m-%dT%H:%M:%SZ}; copy {anchor} to the VM "
          "and run the line above there as root", file=sys.stderr)
    return 0


def _published_bundle(core: client.CoreV1Api, control_ns: str) -> str:
    try:
        cm = core.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, control_ns)
    except ApiException as e:
        if e.status == 404:
            return ""
        raise
    return str((cm.data or {}).get(TRUST_ROOTS_KEY) or "")


def _domain_of(bundle_pem: str) -> str:
    if not bundle_pem:
        raise ConfigError("cannot tell the trust domain: the control plane has not published "
                          "its trust bundle yet; pass --trust-domain")
    return ca.anchor_trust_domain(TrustBundle.from_pem(bundle_pem.encode()).anchors[0])


def _ca_pem(api: client.ApiClient) -> str:
    path = api.configuration.ssl_ca_cert
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the API server's CA {path}: {e.strerror}") from e


def apply_workload(api: client.ApiClient, *, namespace: str, name: str, identity: Identity,
                   labels: dict[str, str], ports: list[tuple[str, int]]) -> None:
    """Create the ExternalWorkload, or update its identity, and the labels and ports
    given (its address, set by the VM, is kept)."""
    objects = client.CustomObjectsApi(api)
    spec: dict[str, Any] = {"meshTLS": {"identity": identity.dns_name,
                                        "serverName": identity.dns_name},
                            "ports": [{"name": n, "port": p, "protocol": "TCP"}
                                      for n, p in ports]}
    current: Any
    try:
        current = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status != 404:
            raise
        current = None
    if current is None:
        spec["workloadIPs"] = []
        try:
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": spec})
        except ApiException as e:
            if e.status == 404:  # the kind itself is unknown
                raise ConfigError(f"the ExternalWorkload CRD ({PLURAL}.{GROUP}) is not "
                                  "installed in this cluster; install "
                                  "deploy/crds/workload.yaml") from e
            raise
        return
    meta = current.get("metadata") or {}
    spec["workloadIPs"] = (current.get("spec") or {}).get("workloadIPs") or []
    if not ports:  # minting another token leaves the ports declared before alone
        spec["ports"] = (current.get("spec") or {}).get("ports") or []
    objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {
        "metadata": {"labels": {**(meta.get("labels") or {}), **labels}}, "spec": spec})


def prepare_credential(api: client.ApiClient, *, namespace: str, workload: str) -> str:
    """The agent's ServiceAccount, Role, RoleBinding and token Secret; the Secret's name."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    name = credential_name(workload)
    meta = client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "meshgate",
                                                  "meshgate.io/workload": workload})
    _create(core.create_namespaced_service_account, namespace,
            client.V1ServiceAccount(metadata=meta))
    role = client.V1Role(metadata=meta, rules=[client.V1PolicyRule(
        api_groups=[GROUP], resources=[PLURAL, f"{PLURAL}/status"], resource_names=[workload],
        verbs=["get", "update", "patch"])])
    if not _create(rbac.create_namespaced_role, namespace, role):
        rbac.replace_namespaced_role(name, namespace, role)
    _create(rbac.create_namespaced_role_binding, namespace, client.V1RoleBinding(
        metadata=meta, role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io",
                                                 kind="Role", name=name),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=name,
                                       namespace=namespace)]))
    secret = f"{name}-token"
    _create(core.create_namespaced_secret, namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret, labels=meta.labels, annotations={
            "kubernetes.io/service-account.name": name}),
        type="kubernetes.io/service-account-token"))
    deadline = time.monotonic() + TOKEN_WAIT
    while True:  # the cluster's token controller fills the Secret in
        data = core.read_namespaced_secret(secret, namespace).data or {}
        if data.get("token") and base64.b64decode(data["token"]):
            return secret
        if time.monotonic() > deadline:
            raise ConfigError(f"Secret {namespace}/{secret} got no token within "
                              f"{TOKEN_WAIT:.0f}s; is the cluster's token controller "
                              "running?")
        time.sleep(0.2)


def _create(fn: Any, namespace: str, body: Any) -> bool:
    """Create; False when it exists already."""
    try:
        fn(namespace, body)
    except ApiException as e:
        if e.status == 409:
            return False
        raise
    return True

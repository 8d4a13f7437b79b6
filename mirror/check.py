"""`meshgate multicluster check`: what is wrong with the importing cluster's
links, one line per check, in the manner of ``linkerd check``.

Each check is an `Outcome`: ``ok`` and what holds, or ``FAIL``, the cause and
the fix. The checks run against the real APIs: the importing cluster with the
given kubeconfig, and each linked cluster with the credential in its Link's
Secret, exactly as the mirror controller would use it. Checks that depend on
one that failed are left out (no credential: nothing is asked of the remote
API), so each problem is named once. `run_check` prints the lines as they
come and returns 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.control import crds
from mesh.discovery.failover import CLUSTERS_ANNOTATION
from mesh.errors import ConfigError, CrdError
from mesh.identity.bundle import TrustBundle, describe
from mesh.identity.errors import TrustSetupError
from mesh.identity.names import DEFAULT_CONTROL_NS
from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, bundle_of
from mesh.kube import first_line, root_cause
from mesh.workqueue import TemporaryError
from mirror.audit import LocalView, collisions, missing_endpoints, orphans, unlinked
from mirror.crds import crd_documents
from mirror.credentials import (
    SECRET_FIX,
    RemoteCredentials,
    credentials_from_secret,
    read_secret,
    verify,
)
from mirror.errors import CredentialsError, LinkSpecError, RemoteUnreachable
from mirror.failover import missing_mirrors
from mirror.gateways import cluster_name, condition
from mirror.importing import LINK_CRD, REQUEST_TIMEOUT, ImportingCluster, Obj, quiet_retries
from mirror.link import EXPORTED_LABEL, LinkSpec, parse_spec

READS = tuple((verb, group, resource) for group, resource in
              (("", "services"), ("discovery.k8s.io", "endpointslices"))
              for verb in ("get", "list", "watch"))
"""What a link credential must be allowed: the mirror controller's informers."""
WRITES = (("create", "", "services"), ("delete", "", "services"), ("patch", "", "services"),
          ("update", "discovery.k8s.io", "endpointslices"),
          ("delete", "discovery.k8s.io", "endpointslices"), ("get", "", "secrets"),
          ("list", "", "secrets"), ("create", "", "pods"), ("delete", "", "namespaces"),
          ("create", "rbac.authorization.k8s.io", "clusterrolebindings"))
"""A sample of what a read-only link credential must not be allowed."""


@dataclass(frozen=True)
class Outcome:
    title: str
    ok: bool
    cause: str = ""
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.title}"
        return f"FAIL  {self.title}: {self.cause}; fix: {self.fix}"


def passed(title: str) -> Outcome:
    return Outcome(title, True)


def failed(title: str, cause: str, fix: str) -> Outcome:
    return Outcome(title, False, cause.rstrip("."), fix)


def run_check(args: argparse.Namespace) -> int:
    quiet_retries()
    cluster = ImportingCluster(args.kubeconfig, args.namespace)
    failures = 0
    try:
        for outcome in checks(cluster):
            print(outcome.line(), flush=True)
            failures += not outcome.ok
    finally:
        cluster.close()
    print(f"{failures} check{'s' if failures != 1 else ''} failed" if failures
          else "every check passed")
    return 1 if failures else 0


def checks(cluster: ImportingCluster) -> Iterator[Outcome]:
    crd = cluster.link_crd()
    if crd is None:
        yield failed(f"the CustomResourceDefinition {LINK_CRD} is installed",
                     f"the importing cluster at {cluster.server} does not have it, so it "
                     "can hold no Link", "install it: `kubectl --kubeconfig IMPORTING apply -f "
                     "deploy/crds/multicluster.yaml`, then link again")
        return
    yield passed(f"the CustomResourceDefinition {LINK_CRD} is installed")
    current = _crd_current(crd)
    if current is not None:
        yield current
    links = cluster.links()
    local = LocalView.read(cluster)
    if not links:
        yield passed(f"no Links in namespace {cluster.namespace}: nothing more to check")
    for link in links:
        yield from LinkCheck(cluster, link, local).run()
    found = unlinked(local, {cluster_name(link) for link in cluster.all_links()})
    title = "every mirror Service belongs to a Link"
    if not found:
        yield passed(title)
    else:
        gone = sorted({c for _, c in found})
        yield failed(title, "mirrors of clusters that no Link names: " + ", ".join(
                         f"{where} (cluster {c})" for where, c in found),
                     "remove them with " + " and ".join(
                         f"`meshgate multicluster unlink --kubeconfig IMPORTING "
                         f"--cluster-name {c}`" for c in gone))


class LinkCheck:
    """The checks of one Link, in order; each stops what depends on it."""

    def __init__(self, cluster: ImportingCluster, link: Obj, local: LocalView) -> None:
        self.cluster, self.link, self.local = cluster, link, local
        self.name = str(link["metadata"]["name"])
        self.target = cluster_name(link)
        self.prefix = f"Link {self.name}"
        self.creds: RemoteCredentials | None = None

    def run(self) -> Iterator[Outcome]:
        try:
            spec = parse_spec(self.link)
        except LinkSpecError as e:
            yield failed(f"{self.prefix}: its spec is valid", str(e),
                         f"correct it: `kubectl -n {self.cluster.namespace} edit link "
                         f"{self.name}`")
            return
        yield from self._credentials(spec)
        controller = self._controller()
        yield controller
        if controller.ok:  # without one, the Link's GatewayAlive condition is stale
            yield self._gateway()
        yield self._endpoints(spec)
        yield from self._failover()
        if self.creds is not None:
            yield from self._trust()
            yield from self._remote_mirrors(spec)

    # -- the credential ----------------------------------------------------------------

    def _credentials(self, spec: LinkSpec) -> Iterator[Outcome]:
        ref = f"{self.cluster.namespace}/{spec.cluster_credentials_secret}"
        title = f"{self.prefix}: credentials Secret {ref} exists and holds a kubeconfig"
        relink = (f"run `meshgate multicluster link --kubeconfig EXPORTING --cluster-name "
                  f"{self.target} ...` and apply what it prints in this cluster")
        try:
            secret = read_secret(self.cluster.core, self.cluster.namespace,
                                 spec.cluster_credentials_secret)
            creds = credentials_from_secret(secret)
        except CredentialsError as e:
            yield failed(title, _cause(e), relink)
            return
        except TemporaryError as e:  # the importing cluster itself: nothing more to ask
            raise ConfigError(str(e)) from e
        yield passed(title)
        reach = f"{self.prefix}: the API of cluster {self.target} at {creds.server} answers"
        valid = f"{self.prefix}: the credential is accepted and may read Services and " \
                "EndpointSlices"
        try:
            verify(creds, label_selector="", secret=ref)
        except RemoteUnreachable as e:
            yield failed(reach, str(e), "check that the cluster is up and that this machine "
                         f"reaches {creds.server}; if its address changed, {relink}")
            return
        except CredentialsError as e:
            if e.reason == "RemoteCertificateInvalid":
                yield failed(reach, _cause(e), relink)
                return
            yield passed(reach)
            fix = relink if e.reason == "CredentialsRejected" else (
                f"grant it get, list and watch on services and endpointslices, or {relink}")
            yield failed(valid, _cause(e), fix)
            return
        yield passed(reach)
        denied = [f"{v} {r}" for v, g, r in READS if _may(creds, v, g, r) is False]
        if denied:
            yield failed(valid, f"the credential in Secret {ref} may not "
                         f"{', '.join(denied)} at {creds.server}",
                         f"grant it get, list and watch on services and endpointslices, or "
                         f"{relink}")
            return
        yield passed(valid)
        self.creds = creds
        answers = {(v, r): (_may(creds, v, g, r), _may(creds, v, g, r, DEFAULT_CONTROL_NS))
                   for v, g, r in WRITES}
        allowed = [f"{v} {r}" for (v, r), said in answers.items() if True in said]
        title = f"{self.prefix}: the credential is read-only"
        if any(None in said for said in answers.values()):
            yield failed(title, f"cluster {self.target} did not answer SelfSubjectAccessReviews "
                         "for the credential, so what else it may do is unknown",
                         "run the check again; the API must serve authorization.k8s.io/v1")
        elif allowed:
            yield failed(title, f"the credential in Secret {ref} may also {', '.join(allowed)} "
                         f"in cluster {self.target}; a stolen link credential should not "
                         "be able to change the linked cluster", relink)
        else:
            yield passed(title)

    # -- the controller's view -----------------------------------------------------------

    def _controller(self) -> Outcome:
        title = f"{self.prefix}: a mirror controller is serving it"
        serving = self.cluster.serving(self.name)
        if serving.problem:
            return failed(title, serving.problem, "start one: `meshgate mirror run --kubeconfig "
                          f"IMPORTING --link {self.name} --namespace {self.cluster.namespace}`")
        return passed(f"{title} ({serving.holder})")

    def _gateway(self) -> Outcome:
        title = f"{self.prefix}: the gateway of cluster {self.target} is alive"
        alive = condition(self.link, "GatewayAlive")
        if alive.get("status") == "True":
            return passed(title)
        if not alive or alive.get("status") == "Unknown":
            cause = alive.get("message") or "no mirror controller has probed it yet"
            return failed(title, cause, "start the Link's mirror controller and wait for "
                          "its first probes")
        spec = (self.link.get("spec") or {})
        probe = spec.get("probeSpec") or {}
        return failed(title, f"{alive.get('message') or alive.get('reason')}",
                      f"check that the gateway of {self.target} runs and answers "
                      f"GET {probe.get('path', '/ready')} on port {probe.get('port', 4191)} "
                      f"at {spec.get('gatewayAddress')} from the importing cluster")

    def _endpoints(self, spec: LinkSpec) -> Outcome:
        mirrors = self.local.mirrors_of(self.target)
        count = f"{len(mirrors)} mirror{'' if len(mirrors) == 1 else 's'}"
        title = f"{self.prefix}: every mirror has endpoints ({count})"
        empty = missing_endpoints(self.local, self.target)
        if not empty:
            return passed(title)
        return failed(title, "; ".join(f"{where}: {why}" for where, why in empty),
                      "the Link's mirror controller writes them: check that it runs and "
                      f"that gatewayAddress ({spec.gateway_address or 'empty'}) resolves")

    def _failover(self) -> Iterator[Outcome]:
        """A Service that lists this Link's cluster to fail over to, with no mirror of
        it from there, would be served without that group."""
        for name, cause in missing_mirrors(list(self.local.services.values()), self.target):
            yield failed(f"failover {name}", cause,
                         f"export it in {self.target} (the Link's selector must pick it, as "
                         f"the label {EXPORTED_LABEL}=true does) or remove {self.target} from "
                         f"its {CLUSTERS_ANNOTATION} annotation")

    # -- what needs the linked cluster -------------------------------------------------------

    def _trust(self) -> Iterator[Outcome]:
        assert self.creds is not None
        title = f"{self.prefix}: this cluster and {self.target} share a trust anchor"
        where = f"ConfigMap {DEFAULT_CONTROL_NS}/{TRUST_ROOTS_CONFIGMAP}"
        local_map = self.cluster.config_map(DEFAULT_CONTROL_NS, TRUST_ROOTS_CONFIGMAP)
        if local_map is None:
            yield failed(title, f"this cluster publishes no trust bundle ({where} is missing)",
                         "run its control plane (`meshgate control run`), which publishes it")
            return
        try:
            core: Any = client.CoreV1Api(self.creds.client)
            resp = core.read_namespaced_config_map(
                TRUST_ROOTS_CONFIGMAP, DEFAULT_CONTROL_NS, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT)
            remote_map = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                yield failed(title, f"cluster {self.target} publishes no trust bundle ({where} "
                             "is missing there)", f"run the control plane of {self.target}, "
                             "which publishes it")
            else:
                yield failed(title, f"the link credential may not read {where} in "
                             f"{self.target} ({e.status} {e.reason})",
                             "run `meshgate multicluster link` again (it grants that) and "
                             "apply what it prints")
            return
        except (urllib3.exceptions.HTTPError, OSError) as e:
            yield failed(title, f"{where} could not be read from {self.creds.server}: "
                         f"{first_line(root_cause(e))}", "run the check again")
            return
        try:
            mine = bundle_of(local_map, "the trust bundle of this cluster")
            theirs = bundle_of(remote_map, f"the trust bundle of cluster {self.target}")
        except TrustSetupError as e:
            yield failed(title, str(e), "publish a valid bundle: restart that cluster's "
                         "control plane")
            return
        common = {TrustBundle.fingerprint(a) for a in mine.anchors} & {
            TrustBundle.fingerprint(a) for a in theirs.anchors}
        if common:
            yield passed(title)
            return
        yield failed(title, f"this cluster trusts {_anchors(mine)} and {self.target} trusts "
                     f"{_anchors(theirs)}: no anchor in common, so neither side's proxies "
                     "accept the other's certificates",
                     "give both clusters issuers under one anchor (`meshgate cluster up "
                     "--identity-dir` with the same directory) or add each anchor to the "
                     "other's bundle")

    def _remote_mirrors(self, spec: LinkSpec) -> Iterator[Outcome]:
        assert self.creds is not None
        try:
            core: Any = client.CoreV1Api(self.creds.client)
            resp = core.list_service_for_all_namespaces(_preload_content=False,
                                                        _request_timeout=REQUEST_TIMEOUT)
            remote: list[Obj] = json.loads(resp.data).get("items") or []
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            cause = (f"{e.status} {e.reason}" if isinstance(e, ApiException)
                     else first_line(root_cause(e)))
            yield failed(f"{self.prefix}: the Services of {self.target} can be listed",
                         f"listing them at {self.creds.server} failed: {cause}",
                         "run the check again")
            return
        title = f"{self.prefix}: no orphaned mirrors"
        found = orphans(self.local, remote, spec)
        if found:
            yield failed(title, "; ".join(f"{where}: {why}" for where, why in found),
                         "its mirror controller removes orphans at start and on every resync: "
                         "make sure it runs, or delete them with `kubectl delete service`")
        else:
            yield passed(title)
        title = f"{self.prefix}: no mirror name collisions"
        clashes = collisions(self.local, remote, spec)
        if clashes:
            yield failed(title, "; ".join(clashes), "rename one of the Services, or map its "
                         "namespace elsewhere with the Link's namespaceMapping")
        else:
            yield passed(title)


# -- helpers -------------------------------------------------------------------------------

def _crd_current(installed: Obj) -> Outcome | None:
    """Whether the installed Link CRD is established and the one this meshgate ships;
    None when the shipped one cannot be read (meshgate installed without its tree)."""
    title = f"the CustomResourceDefinition {LINK_CRD} is established and current"
    fix = ("apply the one this meshgate ships: `kubectl --kubeconfig IMPORTING apply -f "
           "deploy/crds/multicluster.yaml`")
    if not crds.is_established(installed):
        return failed(title, "the API server has not established it (see its "
                      "status.conditions)", fix)
    try:
        shipped = [d for d in crd_documents() if d["metadata"]["name"] == LINK_CRD]
    except CrdError:
        return None
    if shipped and not crds.is_current(installed, shipped[0]):
        return failed(title, "it differs from the one this meshgate ships (an older "
                      "version?), so the API server drops the Link fields it does not "
                      "declare", fix)
    return passed(title)


def _cause(e: CredentialsError) -> str:
    """The error's message without the generic fix the controller's condition carries."""
    return str(e).removesuffix(f"; {SECRET_FIX}")


def _may(creds: RemoteCredentials, verb: str, group: str, resource: str,
         namespace: str = "") -> bool | None:
    """A SelfSubjectAccessReview: may the credential do this? None: no answer."""
    attributes: dict[str, Any] = {"verb": verb, "group": group, "resource": resource}
    if namespace:
        attributes["namespace"] = namespace
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes}}
    api: Any = client.AuthorizationV1Api(creds.client)
    try:
        resp = api.create_self_subject_access_review(body, _preload_content=False,
                                                     _request_timeout=REQUEST_TIMEOUT)
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        return None
    return bool((json.loads(resp.data).get("status") or {}).get("allowed"))


def _anchors(bundle: TrustBundle) -> str:
    return ", ".join(describe(a) for a in bundle.anchors)


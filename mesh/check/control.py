"""``meshgate check`` after install: the CRDs, the control plane's objects, its
identity and the proxy injector, decided from objects read once (`ControlState`)
against what `meshgate install` renders (`Expected`) at a given time.

The issuer must chain to the trust roots and be valid now (an expired one fails,
naming its notAfter); less than `EXPIRY_WARNING` left is a warning, as Linkerd
warns under 60 days."""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from mesh import manifests
from mesh.check.names import (
    CONTROL_DEPLOYMENT,
    INJECTOR_SERVICE,
    INJECTOR_WEBHOOK,
    INSTALL_FIX,
    ISSUER_SECRET,
    NS,
    TRUST_ROOTS_CONFIGMAP,
)
from mesh.check.results import Category, Got, Obj, Result
from mesh.control import crds as crd_state
from mesh.identity.bundle import TrustBundle, describe, issued_by, rfc3339
from mesh.identity.errors import TrustSetupError
from mesh.identity.trustroots import bundle_of
from mesh.image import VERSION

EXPIRY_WARNING = timedelta(days=30)
IDENTITY_FIX = ("issue a new issuer under an anchor of the trust roots (`meshgate identity "
                "rotate`), then re-apply `meshgate install --identity-dir DIR | kubectl "
                "apply -f -`")

CRDS = Category("meshgate-crds")
EXISTENCE = Category("meshgate-existence")
VERSIONS = Category("control-plane-version")
IDENTITY = Category("meshgate-identity")
INJECTOR = Category("meshgate-injector")


@dataclass(frozen=True)
class Expected:
    """What `meshgate install` renders: the CRDs and the Deployments."""

    crds: Sequence[Obj]
    deployments: Sequence[Obj]

    @classmethod
    def rendered(cls) -> Expected:
        return cls(crds=manifests.build(manifests.CRDS),
                   deployments=[d for d in manifests.build(manifests.BASE)
                                if d["kind"] == "Deployment"])


@dataclass(frozen=True)
class ControlState:
    """The objects as read, by name (CRDs and Deployments as `Expected` names them)."""

    crds: Mapping[str, Got]
    namespace: Got
    deployments: Mapping[str, Got]
    issuer: Got
    roots: Got
    webhook: Got
    injector_service: Got
    injector_slices: Got
    """An EndpointSliceList of the injector's Service."""
    injector_answer: Got
    """`probe_pod()` as the API server admitted it in a dry run (the injector's answer
    applied, or not); Got(None) when there was nothing to ask in."""


def checks(state: ControlState, expected: Expected, *, now: datetime) -> Iterator[Result]:
    yield from crd_checks(state.crds, expected.crds)
    yield from existence_checks(state, expected.deployments)
    yield from version_checks(state.deployments)
    yield from identity_checks(state.issuer, state.roots, now=now)
    yield from injector_checks(state.webhook, state.injector_service, state.injector_slices,
                               state.injector_answer, now=now)


def crd_checks(read: Mapping[str, Got], shipped: Sequence[Obj]) -> Iterator[Result]:
    title = "control plane CustomResourceDefinitions exist"
    names = [doc["metadata"]["name"] for doc in shipped]
    errors = [f"cannot read {name}: {read[name].error}" for name in names if read[name].error]
    missing = [name for name in names if not read[name].error and read[name].obj is None]
    if errors or missing:
        yield CRDS.fail(title, "\n".join(errors + [f"missing {name}" for name in missing]),
                        "meshgate install --crds | kubectl apply -f -")
        return
    yield CRDS.ok(title)
    title = "control plane CustomResourceDefinitions are established"
    waiting = [name for name in names if not crd_state.is_established(read[name].obj)]
    if waiting:
        yield CRDS.fail(title, "not Established: " + ", ".join(waiting),
                        "kubectl describe crd " + " ".join(waiting) + " (see its conditions)")
    else:
        yield CRDS.ok(title)
    title = "control plane CustomResourceDefinitions are this version's"
    stale = [doc["metadata"]["name"] for doc in shipped
             if not crd_state.is_current(read[doc["metadata"]["name"]].obj, doc)]
    if stale:
        yield CRDS.warn(title, "different from meshgate " + VERSION + "'s: " + ", ".join(stale),
                        "meshgate install --crds | kubectl apply -f -")
    else:
        yield CRDS.ok(title)


def existence_checks(state: ControlState, deployments: Sequence[Obj]) -> Iterator[Result]:
    title = "control plane Namespace exists"
    if state.namespace.error:
        yield EXISTENCE.unreadable(title, f"Namespace {NS}", state.namespace, fatal=True)
        return
    if state.namespace.obj is None:
        yield EXISTENCE.fail(title, f"the Namespace {NS} does not exist: meshgate is not "
                             "installed", INSTALL_FIX, fatal=True)
        return
    yield EXISTENCE.ok(title)
    for doc in deployments:
        yield _available(doc, state.deployments[doc["metadata"]["name"]])


def _available(rendered: Obj, got: Got) -> Result:
    name = rendered["metadata"]["name"]
    title = f"Deployment {name} is available"
    if got.error:
        return EXISTENCE.unreadable(title, f"Deployment {NS}/{name}", got)
    if got.obj is None:
        return EXISTENCE.fail(title, f"Deployment {NS}/{name} does not exist", INSTALL_FIX)
    spec, status = got.obj.get("spec") or {}, got.obj.get("status") or {}
    want = int(spec.get("replicas", 1))
    have = int(status.get("availableReplicas") or 0)
    condition: Obj = next((c for c in status.get("conditions") or []
                           if c.get("type") == "Available"), {})
    if have >= want and condition.get("status") != "False":
        return EXISTENCE.ok(title)
    cause = f"{have} of {want} replicas available"
    if condition.get("status") == "False":
        cause += f" (Available: {condition.get('reason', 'False')}"
        message = str(condition.get("message") or "").rstrip(".")
        cause += f", {message})" if message else ")"
    label = f"app.kubernetes.io/name={name}"
    return EXISTENCE.fail(title, cause, f"kubectl -n {NS} describe deployment {name}; "
                          f"kubectl -n {NS} get pods -l {label}")


def image_tag(image: str) -> str:
    """The tag of an image reference (``repo:tag`` or ``repo:tag@digest``); "" if none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rpartition(":")[2] if ":" in last else ""


def deployment_version(got: Got) -> str | None:
    """The tag of a read Deployment's first container image; None when not read."""
    if got.obj is None:
        return None
    containers = list(manifests.containers(got.obj))
    return image_tag(str(containers[0].get("image", ""))) if containers else None


def version_checks(deployments: Mapping[str, Got]) -> Iterator[Result]:
    title = "control plane and cli versions match"
    skewed = [f"{name} runs {tag or 'an untagged image'}" for name, got in deployments.items()
              if (tag := deployment_version(got)) is not None and tag != VERSION]
    if skewed:
        yield VERSIONS.warn(title, "this meshgate is " + VERSION + "; " + ", ".join(skewed),
                            "upgrade: meshgate install --identity-dir DIR | kubectl apply "
                            "-f - (with this meshgate), or use the meshgate of the cluster's "
                            "version")
    else:
        yield VERSIONS.ok(title)


def identity_checks(secret: Got, roots: Got, *, now: datetime) -> Iterator[Result]:
    title = "issuer Secret and trust roots exist"
    for got, what in ((secret, f"Secret {NS}/{ISSUER_SECRET}"),
                      (roots, f"ConfigMap {NS}/{TRUST_ROOTS_CONFIGMAP}")):
        if got.error:
            yield IDENTITY.unreadable(title, what, got)
            return
        if got.obj is None:
            yield IDENTITY.fail(title, f"the {what} does not exist", INSTALL_FIX)
            return
    assert secret.obj is not None and roots.obj is not None
    try:
        chain = _issuer_chain(secret.obj)
        bundle = bundle_of(roots.obj, f"the ConfigMap {NS}/{TRUST_ROOTS_CONFIGMAP}")
    except TrustSetupError as e:
        yield IDENTITY.fail(title, str(e), IDENTITY_FIX)
        return
    yield IDENTITY.ok(title)
    yield from _validity(IDENTITY, "trust roots", bundle.anchors, now, fix=(
        "add a new anchor and move the issuer to it: `meshgate identity rotate`"))
    title = "issuer certificate is issued by the trust roots"
    if _chains(chain, bundle):
        yield IDENTITY.ok(title)
    else:
        yield IDENTITY.fail(title, f"{describe(chain[0])} (issued by "
                            f"{chain[0].issuer.rfc4514_string()}) does not chain to the trust "
                            f"roots, which hold {', '.join(map(describe, bundle.anchors))}",
                            IDENTITY_FIX)
    yield from _validity(IDENTITY, "issuer certificate", chain[:1], now, fix=IDENTITY_FIX)


def _validity(category: Category, what: str, certs: Sequence[x509.Certificate],
              now: datetime, *, fix: str) -> Iterator[Result]:
    title = f"{what} {'are' if what.endswith('s') else 'is'} within the validity period"
    outside = [c for c in certs if not c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    if outside:
        yield category.fail(title, "\n".join(
            f"{describe(c)} " + (f"expired: notAfter {rfc3339(c.not_valid_after_utc)}"
                                 if now > c.not_valid_after_utc else
                                 f"is not valid before {rfc3339(c.not_valid_before_utc)}")
            + f" (now {rfc3339(now)})" for c in outside), fix)
        return
    yield category.ok(title)
    days = EXPIRY_WARNING.days
    title = f"{what} {'are' if what.endswith('s') else 'is'} valid for at least {days} days"
    soon = [c for c in certs if c.not_valid_after_utc - now < EXPIRY_WARNING]
    if soon:
        yield category.warn(title, "\n".join(
            f"{describe(c)} expires soon: notAfter {rfc3339(c.not_valid_after_utc)}"
            for c in soon), fix)
    else:
        yield category.ok(title)


def _issuer_chain(secret: Obj) -> list[x509.Certificate]:
    where = f"Secret {NS}/{ISSUER_SECRET}"
    data = (secret.get("data") or {}).get("tls.crt")
    if not data:
        raise TrustSetupError(f"the {where} has no tls.crt")
    try:
        return x509.load_pem_x509_certificates(base64.b64decode(data, validate=True))
    except (ValueError, binascii.Error) as e:
        raise TrustSetupError(f"the {where}'s tls.crt holds no PEM certificate ({e})") from e


def _chains(chain: Sequence[x509.Certificate], bundle: TrustBundle) -> bool:
    """Whether each certificate was signed by the next and the last by an anchor."""
    if not all(issued_by(cert, up) for cert, up in itertools.pairwise(chain)):
        return False
    return bundle.contains(chain[-1]) or bundle.signer_of(chain[-1]) is not None


PROBE_NAMESPACE = "default"


def probe_pod() -> Obj:
    """A Pod asking for injection, created only as a dry run (nothing is stored or run):
    the API server calls the injector for it, so what comes back shows whether the
    injector answers."""
    from mesh.image import reference
    from mesh.inject import INJECT_ANNOTATION

    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "meshgate-check-injector-probe",
                         "annotations": {INJECT_ANNOTATION: "enabled"}},
            "spec": {"containers": [{"name": "probe", "image": reference()}]}}


def injector_checks(webhook: Got, service: Got, slices: Got, answer: Got, *,
                    now: datetime) -> Iterator[Result]:
    title = f"proxy injector MutatingWebhookConfiguration {INJECTOR_WEBHOOK} exists"
    fix = ("install a meshgate that ships the proxy injector: meshgate install "
           "--identity-dir DIR | kubectl apply -f -")
    if webhook.error:
        yield INJECTOR.unreadable(title, f"MutatingWebhookConfiguration {INJECTOR_WEBHOOK}",
                                  webhook)
        return
    if webhook.obj is None:
        yield INJECTOR.fail(title, f"there is no MutatingWebhookConfiguration "
                            f"{INJECTOR_WEBHOOK}: pods are not injected with a proxy", fix)
        return
    hooks = webhook.obj.get("webhooks") or []
    wrong = [f"{h.get('name')} calls {_target(h)}" for h in hooks
             if _target(h) != f"service {NS}/{INJECTOR_SERVICE}"]
    if not hooks or wrong:
        yield INJECTOR.fail(title, "it does not call the Service "
                            f"{NS}/{INJECTOR_SERVICE}: " + ("; ".join(wrong) or
                                                            "it has no webhooks"), fix)
        return
    yield INJECTOR.ok(title)
    yield from _ca_bundle_checks(hooks, now)
    title = f"proxy injector Service {INJECTOR_SERVICE} has ready endpoints"
    policies = sorted({h.get("failurePolicy") or "Fail" for h in hooks})
    down = ("so the webhook cannot answer: " + " and ".join(
        "with failurePolicy Ignore, pods are admitted without a proxy" if p == "Ignore" else
        f"with failurePolicy {p}, pods it selects are refused" for p in policies))
    for got, what in ((service, f"Service {NS}/{INJECTOR_SERVICE}"),
                      (slices, f"the EndpointSlices of {NS}/{INJECTOR_SERVICE}")):
        if got.error:
            yield INJECTOR.unreadable(title, what, got)
            return
    if service.obj is None:
        yield INJECTOR.fail(title, f"the Service {NS}/{INJECTOR_SERVICE} does not exist, "
                            + down, fix)
        return
    ready = [e for s in (slices.obj or {}).get("items") or [] for e in s.get("endpoints") or []
             if (e.get("conditions") or {}).get("ready") is not False]
    if not ready:
        yield INJECTOR.fail(title, f"the Service {NS}/{INJECTOR_SERVICE} has no ready "
                            "endpoints, " + down,
                            f"kubectl -n {NS} get pods -l app.kubernetes.io/name="
                            f"{CONTROL_DEPLOYMENT} (the control plane serves the injector)")
        return
    yield INJECTOR.ok(title)
    yield from _answer_check(answer, policies)


def _answer_check(answer: Got, policies: list[str]) -> Iterator[Result]:
    title = "proxy injector answers the API server"
    fix = (f"kubectl -n {NS} logs deploy/{CONTROL_DEPLOYMENT} (it serves the injector), and "
           f"check that the API server reaches the Service {NS}/{INJECTOR_SERVICE}:443")
    if answer.error:
        yield INJECTOR.fail(title, "a dry-run Pod asking for injection in namespace "
                            f"{PROBE_NAMESPACE} was refused: {answer.error}", fix)
        return
    if answer.obj is None:  # 404: no namespace to ask in
        yield INJECTOR.warn(title, f"there is no namespace {PROBE_NAMESPACE} to ask the "
                            "injector for a dry-run Pod in", fix)
        return
    inits = [c.get("name") for c in (answer.obj.get("spec") or {}).get("initContainers") or []]
    if "meshgate-proxy" not in inits:
        yield INJECTOR.fail(title, "a dry-run Pod asking for injection in namespace "
                            f"{PROBE_NAMESPACE} came back without the proxy: the injector did "
                            "not answer" + (" (failurePolicy Ignore admits pods without it)"
                                            if "Ignore" in policies else "")
                            + ", or the webhook's selectors leave that namespace out", fix)
        return
    yield INJECTOR.ok(title)


def _ca_bundle_checks(hooks: Sequence[Obj], now: datetime) -> Iterator[Result]:
    """The CA the API server verifies the injector's serving certificate with."""
    title = "proxy injector webhook has a CA bundle"
    fix = (f"kubectl get mutatingwebhookconfiguration {INJECTOR_WEBHOOK} -o yaml: each "
           "webhook's clientConfig.caBundle must hold the CA of the injector's serving "
           "certificate")
    certs: list[x509.Certificate] = []
    for hook in hooks:
        data = (hook.get("clientConfig") or {}).get("caBundle")
        try:
            certs += x509.load_pem_x509_certificates(base64.b64decode(data or "",
                                                                      validate=True))
        except (ValueError, binascii.Error):
            yield INJECTOR.fail(title, f"webhook {hook.get('name')} has "
                                + ("a caBundle holding no PEM certificate" if data else
                                   "no caBundle") + ", so the API server cannot verify the "
                                "injector", fix)
            return
    yield INJECTOR.ok(title)
    yield from _validity(INJECTOR, "proxy injector CA bundle", certs, now, fix=fix)


def _target(hook: Obj) -> str:
    config = hook.get("clientConfig") or {}
    if "service" in config:
        svc = config["service"]
        return f"service {svc.get('namespace')}/{svc.get('name')}"
    return f"url {config.get('url')}"

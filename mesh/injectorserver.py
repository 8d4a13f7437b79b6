"""The proxy injector as an admission webhook: ``POST /inject`` over HTTPS, served by
the control plane (``meshgate control run --injector-listen 0.0.0.0:8443``).

Its serving certificate names the Service ``meshgate-injector.meshgate.svc`` and is
signed by the control plane's identity issuer, so the webhook's ``caBundle`` is the
mesh's trust bundle (`meshgate install` renders it). It is re-signed well before it
expires and whenever the issuer changes. Each review reads the Pod's namespace (for
its ``meshgate.io/inject`` annotation) and the cluster's service CIDRs, unless they
were given, in a thread, then answers with mesh.injector's decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import ConfigError, MeshError
from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import CertKey
from mesh.identity.tls import load_identity
from mesh.inject import InjectSettings
from mesh.injector import review

log = logging.getLogger("mesh.injector")

SERVICE = "meshgate-injector"
PATH = "/inject"
CERT_LIFETIME = dt.timedelta(hours=24)
RENEW_AFTER = 0.5
"""Share of the serving certificate's lifetime after which it is signed again."""


def serving_names(control_ns: str, cluster_domain: str) -> list[str]:
    """The names the API server may ask for: ``<svc>.<ns>.svc`` (what it verifies)."""
    return [f"{SERVICE}.{control_ns}.svc", f"{SERVICE}.{control_ns}.svc.{cluster_domain}"]


def sign_serving_cert(issuer: CertKey, key: ec.EllipticCurvePrivateKey, names: list[str],
                      *, now: dt.datetime, lifetime: dt.timedelta = CERT_LIFETIME
                      ) -> x509.Certificate:
    """A TLS server certificate for `names`, signed by the issuer (never past it)."""
    start = now - ca.BACKDATE
    end = min(now + lifetime, issuer.cert.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.key.public_key()), critical=False)
            .sign(issuer.key, hashes.SHA256()))


@dataclass(frozen=True)
class InjectorConfig:
    trust_domain: str
    cluster_domain: str
    control_ns: str
    service_cidrs: tuple[str, ...] = ()
    """Empty: read from the cluster on each review (mesh.injectcmd.ClusterSettings)."""


class Injector:
    """The webhook's HTTPS server; `issuer` gives the current issuer and bundle."""

    def __init__(self, config: InjectorConfig, kube: Any,
                 issuer: Callable[[], tuple[CertKey, TrustBundle]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.kube, self.issuer, self.clock = config, kube, issuer, clock
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._signed_by: x509.Certificate | None = None
        self._renew_at = 0.0
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def refresh(self) -> None:
        """Sign a new serving certificate if the issuer changed or half its life passed."""
        issuer, _ = self.issuer()
        now = self.clock()
        if self._signed_by == issuer.cert and now < self._renew_at:
            return
        key = ec.generate_private_key(ec.SECP256R1())
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        cert = sign_serving_cert(issuer, key, serving_names(self.config.control_ns,
                                                            self.config.cluster_domain),
                                 now=when)
        load_identity(self.context, ca.cert_pem(cert) + ca.cert_pem(issuer.cert),
                      ca.key_pem(key))
        self._signed_by = issuer.cert
        lifetime = (cert.not_valid_after_utc - when).total_seconds()
        self._renew_at = now + RENEW_AFTER * lifetime

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH, self._inject)
        return app

    async def start(self, host: str, port: int) -> None:
        self.refresh()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port} for the injector: "
                              f"{e.strerror or e}; choose another --injector-listen") from e
        self.address = sock.getsockname()[:2]
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        await web.SockSite(runner, sock, ssl_context=self.context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def maintain(self, every: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                self.refresh()
            except MeshError as e:
                log.error("injector certificate not renewed cause=%s", e)

    async def _inject(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400, text="the body is not JSON\n")
        if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
            return web.Response(status=400, text="the body is not an AdmissionReview with a "
                                "request\n")
        namespace = str(body["request"].get("namespace") or "")
        try:
            settings, ns_annotations = await asyncio.to_thread(self._settings, namespace)
            answer, decision = review(body, settings, ns_annotations)
        except MeshError as e:
            log.error("injector review failed namespace=%s cause=%s", namespace, e)
            return web.Response(status=400 if isinstance(e, ConfigError) else 500,
                                text=f"{e}\n")
        log.info("injector pod=%s/%s injected=%s reason=%s", decision.namespace, decision.pod,
                 decision.injected, decision.reason)
        return web.json_response(answer)

    def _settings(self, namespace: str) -> tuple[InjectSettings, dict[str, Any]]:
        """Blocking: the namespace's annotations and the settings to inject with."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        from mesh.injectcmd import ClusterSettings

        _, bundle = self.issuer()
        annotations: dict[str, Any] = {}
        if namespace:
            try:
                ns = client.CoreV1Api(self.kube).read_namespace(namespace)
                meta = ns.metadata
                annotations = dict((meta.annotations if meta else None) or {})
            except ApiException as e:
                raise MeshError(f"cannot read namespace {namespace}: {e.status} "
                                f"{e.reason}") from None
        cidrs = self.config.service_cidrs or tuple(ClusterSettings(self.kube).service_cidrs())
        settings = InjectSettings(service_cidrs=cidrs,
                                  trust_anchors_pem=bundle.to_pem().decode("ascii"),
                                  trust_domain=self.config.trust_domain,
                                  cluster_domain=self.config.cluster_domain,
                                  control_ns=self.config.control_ns)
        return settings, annotations

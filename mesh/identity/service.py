"""The identity service: signs workload certificates for callers that prove who
they are.

``POST /v1/certify`` takes ``{"csr": PEM, "token": "..."}``. The token is a
ServiceAccount token (checked with TokenReview for the audience
``identity.meshgate.io``) or a VM join token (redeemed once). A caller that
already holds a valid certificate may instead present it over mTLS to renew
the same identity. The CSR must ask for exactly the identity proven. Every
refusal is a 4xx whose JSON body says why (``error`` code and ``message``),
counted by reason; the service keeps serving everyone else.

The issuer and trust bundle are re-read from the issuer directory when their
files change, which is how anchor and issuer rotation reach a running service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from urllib3.exceptions import HTTPError

from mesh.errors import IdentityError
from mesh.identity import ca, jointoken
from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import CertKey, CsrRefused, IssuerDir
from mesh.identity.names import SERVICE_AUDIENCE, Identity, service_identity
from mesh.identity.tls import load_identity, peer_chain

log = logging.getLogger(__name__)

AUDIENCE = SERVICE_AUDIENCE
MAX_BODY = 64 * 1024


def _join_token_unreadable(token: str, e: ApiException) -> Refusal:
    """The cluster would not let the control plane read or spend a join token."""
    namespace = jointoken.parse(token).namespace
    if e.status == 403:
        return Refusal(503, "join-tokens-forbidden", f"the control plane may not read join "
                       f"tokens in namespace {namespace}: bind the ClusterRole "
                       f"meshgate-control-join-tokens there (kubectl -n {namespace} create "
                       "rolebinding meshgate-control-join-tokens --clusterrole=meshgate-"
                       "control-join-tokens --serviceaccount=meshgate:meshgate-control)")
    return Refusal(503, "cluster-unavailable", f"cannot read the join token from the "
                   f"cluster: {e.status} {e.reason}")


class Refusal(Exception):
    """A request the service will not honour: HTTP status, reason code, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class _Issuer:
    key: CertKey
    bundle: TrustBundle
    stamp: tuple[float, ...]


class IdentityService:
    def __init__(self, issuer_dir: Path, kube: client.ApiClient | None, *, trust_domain: str,
                 control_ns: str = "meshgate", leaf_lifetime: dt.timedelta = dt.timedelta(hours=24),
                 clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self.dir = IssuerDir(issuer_dir)
        self.kube = kube
        self.trust_domain = trust_domain
        self.control_ns = control_ns
        self.leaf_lifetime = leaf_lifetime
        self.clock = clock
        self.metrics = registry or CollectorRegistry()
        self.issued = Counter("identity_certificates_issued", "Certificates signed, by proof",
                              ["proof"], registry=self.metrics)
        self.denied = Counter("identity_certificates_denied", "Requests refused, by reason",
                              ["reason"], registry=self.metrics)
        self.issuer_expiry = Gauge("identity_issuer_expiration_timestamp_seconds",
                                   "When the issuer certificate expires", registry=self.metrics)
        self._issuer: _Issuer | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self.identity = service_identity(trust_domain, control_ns)

    # -- issuer material ------------------------------------------------------------

    def _files(self) -> list[Path]:
        return [self.dir.path / n for n in ("issuer.crt", "issuer.key", "trust-bundle.pem")]

    def issuer(self) -> _Issuer:
        """The current issuer and bundle, re-read when their files have changed."""
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in self._files())
        if self._issuer is None or self._issuer.stamp != stamp:
            key, bundle = self.dir.load_issuer(), self.dir.load_bundle()
            self._issuer = _Issuer(key, bundle, stamp)
            self.issuer_expiry.set(key.cert.not_valid_after_utc.timestamp())
            log.info("issuer loaded subject=%s anchors=%s not_after=%s",
                     key.cert.subject.rfc4514_string(),
                     ",".join(bundle.describe(a) for a in bundle.anchors),
                     key.cert.not_valid_after_utc.isoformat())
            if self._server_ctx is not None:
                self._refresh_server_identity()
        return self._issuer

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def sign(self, public_key: ec.EllipticCurvePublicKey, identity: Identity) -> list[bytes]:
        cur = self.issuer()
        leaf = ca.sign_leaf(cur.key, public_key, identity, now=self._now(),
                            lifetime=self.leaf_lifetime)
        return [ca.cert_pem(leaf), ca.cert_pem(cur.key.cert)]

    def server_context(self) -> ssl.SSLContext:
        """TLS for the service: its own identity, client certificates optional (renewal)."""
        if self._server_ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_OPTIONAL
            # No session tickets: each caller's whole chain is checked against the
            # current trust bundle (anchor rotation), and a resumed session shows only
            # the leaf. Its callers hold long streams; resumption would buy little.
            ctx.num_tickets = 0
            self._server_ctx = ctx
            self.issuer()
            self._refresh_server_identity()
        return self._server_ctx

    def _refresh_server_identity(self) -> None:
        assert self._server_ctx is not None and self._issuer is not None
        key = ec.generate_private_key(ec.SECP256R1())
        chain = b"".join(self.sign(key.public_key(), self.identity))
        load_identity(self._server_ctx, chain, ca.key_pem(key))
        self._server_ctx.load_verify_locations(cadata=self._issuer.bundle.ssl_cadata())

    # -- proofs -----------------------------------------------------------------------

    async def _prove(self, token: str | None, peer_cert: x509.Certificate | None
                     ) -> tuple[Identity, str, jointoken.Grant | None]:
        if token:
            if self.kube is None:
                raise Refusal(503, "cluster-unavailable", "the service has no cluster to "
                              "check tokens with")
            core = client.CoreV1Api(self.kube)
            if jointoken.is_join_token(token):
                try:
                    grant = await asyncio.to_thread(jointoken.redeem, core, token,
                                                    clock=self.clock)
                except jointoken.JoinTokenRefused as e:
                    raise Refusal(401, e.reason, str(e)) from e
                except ApiException as e:
                    raise _join_token_unreadable(token, e) from e
                except (HTTPError, OSError) as e:
                    raise Refusal(503, "cluster-unavailable", "cannot read the join token "
                                  f"from the cluster: {e}") from e
                return Identity(grant.namespace, grant.service_account, self.trust_domain,
                                self.control_ns), "join-token", grant
            return await self._review(token), "service-account-token", None
        if peer_cert is not None:
            return Identity.from_certificate(peer_cert), "renewal", None
        raise Refusal(401, "no-credential", "send a ServiceAccount token, a join token, or "
                      "present your current certificate to renew it")

    async def _review(self, token: str) -> Identity:
        api = client.AuthenticationV1Api(self.kube)
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token,
                                                                  audiences=[AUDIENCE]))
        try:
            review = await asyncio.to_thread(api.create_token_review, body)
        except (ApiException, HTTPError, OSError) as e:
            raise Refusal(503, "cluster-unavailable", f"cannot review the token with the "
                          f"cluster's API server: {getattr(e, 'reason', e)}") from e
        status = review.status or client.V1TokenReviewStatus()
        if not status.authenticated:
            raise Refusal(401, "invalid-token", f"the ServiceAccount token was refused: "
                          f"{status.error or 'not authenticated'}")
        username = (status.user.username if status.user else None) or ""
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise Refusal(403, "not-a-service-account", f"token belongs to {username!r}, "
                          "not to a ServiceAccount")
        return Identity(parts[2], parts[3], self.trust_domain, self.control_ns)

    # -- HTTP ------------------------------------------------------------------------

    async def certify(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            csr = body.get("csr")
            if not isinstance(csr, str):
                raise Refusal(400, "malformed", 'the request needs "csr": a PEM certificate '
                              "signing request")
            token = body.get("token")
            if token is not None and not isinstance(token, str):
                raise Refusal(400, "malformed", '"token" must be a string')
            try:
                wanted, public_key = ca.csr_identity(csr.encode())
            except CsrRefused as e:
                raise Refusal(400, e.reason, str(e)) from e
            proven, proof, grant = await self._prove(token, self._peer_cert(request))
            if wanted != proven:
                raise Refusal(403, "identity-mismatch", f"the {proof.replace('-', ' ')} proves "
                              f"{proven}, but the CSR asks for {wanted}")
            if wanted == self.identity:
                # Proxies trust the control plane by this name: a workload holding it
                # could pose as the control plane to every proxy.
                raise Refusal(403, "reserved-identity", f"{wanted} is the control plane's "
                              "own identity and is never issued to workloads; run the "
                              "workload under another ServiceAccount")
            chain = self.sign(public_key, wanted)
        except Refusal as e:
            self.denied.labels(e.reason).inc()
            log.info("certificate refused peer=%s reason=%s cause=%r", request.remote,
                     e.reason, e.message)
            return web.json_response({"error": e.reason, "message": e.message}, status=e.status)
        self.issued.labels(proof).inc()
        leaf = x509.load_pem_x509_certificate(chain[0])
        log.info("certificate issued identity=%s proof=%s peer=%s not_after=%s", wanted, proof,
                 request.remote, leaf.not_valid_after_utc.isoformat())
        answer: dict[str, Any] = {
            "certificate": chain[0].decode(), "chain": b"".join(chain).decode(),
            "trustBundle": self.issuer().bundle.to_pem().decode(),
            "notAfter": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if grant is not None:
            # A VM learns here, once, which ExternalWorkload it is and how to reach it.
            answer["workload"] = {"namespace": grant.namespace, "name": grant.workload,
                                  "serviceAccount": grant.service_account}
            if grant.agent is not None:
                answer["agent"] = {"server": grant.agent.server, "token": grant.agent.token,
                                   "certificateAuthority": grant.agent.certificate_authority}
        return web.json_response(answer)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Refusal(413, "too-large", f"the request is over {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise Refusal(413, "too-large", f"the request is over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise Refusal(400, "malformed", f"the request is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise Refusal(400, "malformed", "the request must be a JSON object")
        return body

    def _peer_cert(self, request: web.Request) -> x509.Certificate | None:
        """The caller's certificate, if it presented one that the current bundle trusts.

        The TLS layer checked it against every anchor the listener ever loaded;
        an anchor removed since must not let its leaves renew, so check again.
        """
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        if sslobj is None or not sslobj.getpeercert(binary_form=True):
            return None
        chain = peer_chain(sslobj, verified=False)
        try:
            self.issuer().bundle.verify(chain, now=self._now())
        except IdentityError as e:
            raise Refusal(401, "untrusted-certificate", f"the certificate presented for "
                          f"renewal is no longer trusted: {e}") from e
        return chain[0]

    async def status(self, request: web.Request) -> web.Response:
        cur = self.issuer()
        signer = cur.bundle.signer_of(cur.key.cert)
        return web.json_response({
            "trustDomain": self.trust_domain,
            "issuer": {"subject": cur.key.cert.subject.rfc4514_string(),
                       "notAfter": cur.key.cert.not_valid_after_utc.isoformat(),
                       "anchor": cur.bundle.describe(signer) if signer else None},
            "anchors": [cur.bundle.describe(a) for a in cur.bundle.anchors]})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics), content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY * 2)
        app.router.add_post("/v1/certify", self.certify)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/ready", self.ready)
        return app

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def maintain(self, interval: float = 2.0) -> None:
        """Pick up issuer and bundle changes, and renew the service's own certificate."""
        own_expiry = 0.0
        while True:
            try:
                self.issuer()
                now = self.clock()
                if self._server_ctx is not None and now >= own_expiry:
                    self._refresh_server_identity()
                    own_expiry = now + self.leaf_lifetime.total_seconds() * 0.7
            except IdentityError as e:
                log.warning("issuer reload failed dir=%s cause=%s; keeping the current issuer",
                            self.dir.path, e)
            await asyncio.sleep(interval)

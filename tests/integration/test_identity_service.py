"""The identity service against a real embedded cluster: who gets a certificate,
who is refused and why, join tokens, renewal by certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.identity import ca, jointoken
from mesh.identity.ca import IssuerDir
from mesh.identity.names import Identity
from mesh.identity.service import AUDIENCE, IdentityService, service_identity
from mesh.structs import convert
from tests.cluster import Cluster

DOMAIN = "cluster.local"


class Service:
    def __init__(self, svc: IdentityService, url: str, issuers: IssuerDir) -> None:
        self.svc, self.url, self.issuers = svc, url, issuers

    def context(self, chain: bytes | None = None, key: bytes | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.issuers.load_bundle().to_pem().decode())
        if chain and key:
            from mesh.identity.tls import load_identity

            load_identity(ctx, chain, key)
        return ctx

    async def post(self, body: Any, *, raw: bytes | None = None, chain: bytes | None = None,
                   key: bytes | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.url}/v1/certify", data=data, ssl=self.context(chain, key),
                server_hostname=service_identity(DOMAIN, "meshgate").dns_name,
                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def service(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Service]:
    issuers = IssuerDir(tmp_path / "issuer")
    issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=30),
                 issuer_lifetime=dt.timedelta(days=7), now=dt.datetime.now(dt.UTC))
    svc = IdentityService(issuers.path, cluster.api(), trust_domain=DOMAIN)
    runner = web.AppRunner(svc.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=svc.server_context())
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Service(svc, f"https://127.0.0.1:{port}", issuers)
    finally:
        await runner.cleanup()


def _sa(cluster: Cluster, name: str = "web") -> str:
    ns = f"i-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api())
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    return ns


def _token(cluster: Cluster, ns: str, sa: str, audience: str = AUDIENCE) -> str:
    tr = client.CoreV1Api(cluster.api()).create_namespaced_service_account_token(
        sa, ns, {"spec": {"audiences": [audience], "expirationSeconds": 600}})
    return str(tr.status.token)


def _csr(identity: Identity) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca.make_csr(key, identity).public_bytes(serialization.Encoding.PEM).decode(), key


async def test_service_account_token_gets_its_identity(cluster: Cluster, service: Service,
                                                       tmp_path: Path) -> None:
    ns = _sa(cluster)
    me = Identity(ns, "web", DOMAIN)
    csr, _ = _csr(me)
    status, body = await service.post({"csr": csr, "token": _token(cluster, ns, "web")})
    assert status == 200, body
    chain = ca.load_certs(body["chain"].encode())
    assert Identity.from_certificate(chain[0]) == me
    leaf_file, issuer_file = tmp_path / "leaf.pem", tmp_path / "issuer.pem"
    leaf_file.write_bytes(ca.cert_pem(chain[0]))
    issuer_file.write_bytes(ca.cert_pem(chain[1]))
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_text(body["trustBundle"])
    out = subprocess.run(["openssl", "verify", "-CAfile", str(bundle_file), "-untrusted",
                          str(issuer_file), str(leaf_file)], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime == dt.timedelta(hours=24, seconds=20)


@pytest.mark.parametrize("case", ["other-sa", "wrong-audience", "expired", "deleted-sa"])
async def test_refusals(cluster: Cluster, service: Service, case: str) -> None:
    ns = _sa(cluster)
    token = _token(cluster, ns, "web", "other-audience" if case == "wrong-audience" else
                   AUDIENCE)
    wanted = Identity(ns, "admin" if case == "other-sa" else "web", DOMAIN)
    if case == "expired":
        claims = jwt.decode(token, options={"verify_signature": False})
        claims["exp"] = int(time.time()) - 60
        key = serialization.load_pem_private_key((cluster.state_dir / "sa.key").read_bytes(),
                                                 None)
        token = jwt.encode(claims, key, algorithm="ES256")  # type: ignore[arg-type]
    if case == "deleted-sa":
        client.CoreV1Api(cluster.api()).delete_namespaced_service_account("web", ns)
    csr, _ = _csr(wanted)
    status, body = await service.post({"csr": csr, "token": token})
    expected = {"other-sa": (403, "identity-mismatch", f"proves web.{ns}"),
                "wrong-audience": (401, "invalid-token", "audience"),
                "expired": (401, "invalid-token", "expired"),
                "deleted-sa": (401, "invalid-token", "deleted")}[case]
    assert (status, body["error"]) == expected[:2]
    assert expected[2] in body["message"]


async def test_the_control_planes_own_identity_is_never_issued(
        cluster: Cluster, service: Service) -> None:
    core = client.CoreV1Api(cluster.api())
    try:
        core.create_namespace({"metadata": {"name": "meshgate"}})
    except client.ApiException as e:
        assert e.status == 409
    try:
        core.create_namespaced_service_account("meshgate",
                                               {"metadata": {"name": "meshgate-identity"}})
    except client.ApiException as e:
        assert e.status == 409
    token = _token(cluster, "meshgate", "meshgate-identity")
    csr, _ = _csr(Identity("meshgate", "meshgate-identity", DOMAIN))
    status, body = await service.post({"csr": csr, "token": token})
    assert (status, body["error"]) == (403, "reserved-identity")
    assert "never issued to workloads" in body["message"]


async def test_bad_requests_are_refused_and_service_keeps_serving(
        cluster: Cluster, service: Service) -> None:
    ns = _sa(cluster)
    assert (await service.post(None, raw=b"{not json"))[0] == 400
    assert (await service.post(None, raw=b"x" * (70 * 1024)))[0] == 413
    assert (await service.post({"csr": "garbage", "token": "t"}))[1]["error"] == "malformed"
    assert (await service.post({"csr": _csr(Identity(ns, "web", DOMAIN))[0]}))[1]["error"] == \
        "no-credential"
    # A CSR naming an extra host is refused whatever the token.
    key = ec.generate_private_key(ec.SECP256R1())
    me = Identity(ns, "web", DOMAIN)
    extra = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.DNSName(me.dns_name), x509.DNSName("evil.example")]),
        critical=False).sign(key, hashes.SHA256())
    status, body = await service.post({"csr": extra.public_bytes(
        serialization.Encoding.PEM).decode(), "token": _token(cluster, ns, "web")})
    assert (status, body["error"]) == (400, "extra-names")
    csr, _ = _csr(me)
    assert (await service.post({"csr": csr, "token": _token(cluster, ns, "web")}))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(f"{service.url}/metrics",
                                                   ssl=service.context(),
                                                   server_hostname=service.svc.identity.dns_name
                                                   ) as resp:
        page = await resp.text()
    assert 'identity_certificates_denied_total{reason="extra-names"} 1.0' in page
    assert 'identity_certificates_issued_total{proof="service-account-token"} 1.0' in page


async def test_join_token_single_use_even_under_race(cluster: Cluster,
                                                     service: Service) -> None:
    ns = _sa(cluster, "vm")
    core = client.CoreV1Api(cluster.api())
    token, _ = jointoken.mint(core, namespace=ns, workload="db-1", service_account="vm",
                              ttl=dt.timedelta(minutes=10))
    assert jointoken.parse(token).service_account == "vm"
    stored = core.list_namespaced_secret(ns, label_selector="meshgate.io/join-token=true").items
    assert len(stored) == 1 and token.split(".")[-1] not in json.dumps(
        stored[0].to_dict(), default=str)
    me = Identity(ns, "vm", DOMAIN)
    results = await asyncio.gather(*(service.post({"csr": _csr(me)[0], "token": token})
                                     for _ in range(2)))
    assert sorted(r[0] for r in results) == [200, 401]
    assert [r[1]["error"] for r in results if r[0] == 401] == ["token-used"]
    granted = next(r[1] for r in results if r[0] == 200)
    assert granted["workload"] == {"namespace": ns, "name": "db-1", "serviceAccount": "vm"}
    assert "agent" not in granted  # minted without an agent credential
    status, body = await service.post({"csr": _csr(me)[0], "token": token})
    assert (status, body["error"]) == (401, "token-used")


async def test_join_token_for_another_service_account_is_refused(
        cluster: Cluster, service: Service) -> None:
    ns = _sa(cluster, "vm")
    token, _ = jointoken.mint(client.CoreV1Api(cluster.api()), namespace=ns, workload="w",
                              service_account="vm", ttl=dt.timedelta(minutes=5))
    forged = token.replace(".vm.", ".admin.", 1)
    status, body = await service.post({"csr": _csr(Identity(ns, "admin", DOMAIN))[0],
                                       "token": forged})
    assert (status, body["error"]) == (401, "invalid-token")
    status, body = await service.post({"csr": _csr(Identity(ns, "vm", DOMAIN))[0],
                                       "token": "mgjoin.x.y"})
    assert (status, body["error"]) == (401, "malformed-token")
    # The genuine token was not spent by the forgery.
    status, _ = await service.post({"csr": _csr(Identity(ns, "vm", DOMAIN))[0],
                                    "token": token})
    assert status == 200


async def test_expired_join_token(cluster: Cluster, service: Service) -> None:
    ns = _sa(cluster, "vm")
    token, _ = jointoken.mint(client.CoreV1Api(cluster.api()), namespace=ns, workload="w",
                              service_account="vm", ttl=dt.timedelta(minutes=5),
                              clock=lambda: time.time() - 3600)
    status, body = await service.post({"csr": _csr(Identity(ns, "vm", DOMAIN))[0],
                                       "token": token})
    assert (status, body["error"]) == (401, "token-expired")
    assert "mint a new one" in body["message"]


async def test_renewal_with_current_certificate(cluster: Cluster, service: Service) -> None:
    ns = _sa(cluster)
    me = Identity(ns, "web", DOMAIN)
    csr, key = _csr(me)
    status, body = await service.post({"csr": csr, "token": _token(cluster, ns, "web")})
    assert status == 200
    chain, key_pem = body["chain"].encode(), ca.key_pem(key)
    status, renewed = await service.post({"csr": _csr(me)[0]}, chain=chain, key=key_pem)
    assert status == 200, renewed
    status, body = await service.post({"csr": _csr(Identity(ns, "admin", DOMAIN))[0]},
                                      chain=chain, key=key_pem)
    assert (status, body["error"]) == (403, "identity-mismatch")


async def test_removed_anchor_cannot_renew(cluster: Cluster, service: Service) -> None:
    from mesh.identity.rotation import Rotation

    ns = _sa(cluster)
    me = Identity(ns, "web", DOMAIN)
    csr, key = _csr(me)
    status, body = await service.post({"csr": csr, "token": _token(cluster, ns, "web")})
    assert status == 200
    old_chain = body["chain"].encode()
    rotation = Rotation(service.issuers.path, leaf_lifetime=dt.timedelta(hours=24))
    now = dt.datetime.now(dt.UTC)
    rotation.add_anchor(now=now, anchor_lifetime=dt.timedelta(days=30), trust_domain=DOMAIN)
    rotation.reissue_issuer(now=now, issuer_lifetime=dt.timedelta(days=7), trust_domain=DOMAIN,
                            force=True)
    # While both anchors are trusted, the old certificate still renews.
    status, body = await service.post({"csr": _csr(me)[0]}, chain=old_chain,
                                      key=ca.key_pem(key))
    assert status == 200, body
    rotation.remove_anchor(now=now, force=True)
    status, body = await service.post({"csr": _csr(me)[0]}, chain=old_chain,
                                      key=ca.key_pem(key))
    assert (status, body["error"]) == (401, "untrusted-certificate")
    assert "root.cluster.local" in body["message"]


async def test_status_names_the_issuer_and_its_anchor(service: Service) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"{service.url}/v1/status", ssl=service.context(),
            server_hostname=service.svc.identity.dns_name) as resp:
        assert resp.status == 200
        doc = await resp.json()
    anchor = service.issuers.load_bundle().anchors[0]
    assert doc["trustDomain"] == DOMAIN
    assert doc["issuer"]["anchor"] == service.issuers.load_bundle().describe(anchor)
    assert doc["anchors"] == [doc["issuer"]["anchor"]]


async def test_held_files_are_renewed_by_certificate_and_written_back(
        service: Service, tmp_path: Path) -> None:
    """A VM's proxy: it starts from the certificate files `vm join` left, renews them
    at 70 % of their life through the service with the certificate as the proof,
    and writes each renewal back for the next start."""
    from prometheus_client import CollectorRegistry

    from mesh.config import IdentityConfig
    from mesh.identity.certstore import CertStore
    from mesh.proxy.main import load_workload

    me = Identity("vms", "db", DOMAIN)
    key = ec.generate_private_key(ec.SECP256R1())
    # Short-lived, so that renewal falls due within the test.
    leaf = ca.sign_leaf(service.issuers.load_issuer(), key.public_key(), me,
                        now=dt.datetime.now(dt.UTC) - ca.BACKDATE,
                        lifetime=dt.timedelta(seconds=4) + ca.BACKDATE)
    held = ca.cert_pem(leaf) + ca.cert_pem(service.issuers.load_issuer().cert)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(held)
    ca.write_private(key_file, ca.key_pem(key))
    cfg = convert({
        "name": me.dns_name, "trustBundle": str(service.issuers.bundle),
        "server": service.url, "certFile": str(cert_file), "keyFile": str(key_file)},
        IdentityConfig)
    workload, renewal = await load_workload(cfg, CollectorRegistry())
    assert isinstance(workload, CertStore) and renewal is not None
    try:
        assert workload.chain == held  # served at once, before any request
        deadline = time.monotonic() + 15
        while cert_file.read_bytes() == held:
            assert time.monotonic() < deadline, "the held certificate was not renewed"
            await asyncio.sleep(0.1)
        renewed = ca.load_certs(cert_file.read_bytes())
        assert Identity.from_certificate(renewed[0]) == me
        assert renewed[0].not_valid_after_utc - renewed[0].not_valid_before_utc == \
            dt.timedelta(hours=24, seconds=20)
        assert ca.load_key(key_file.read_bytes()).public_key() == renewed[0].public_key()
        assert (key_file.stat().st_mode & 0o777) == 0o600
        assert service.svc.issued.labels("renewal")._value.get() == 1
    finally:
        renewal.cancel()
    # A restart adopts what was written back.
    again, renewal = await load_workload(cfg, CollectorRegistry())
    assert renewal is not None
    renewal.cancel()
    assert again.certificates[0] == renewed[0]


async def test_an_expired_held_certificate_says_to_join_again(
        service: Service, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from mesh.config import IdentityConfig
    from mesh.identity.errors import CertificateExpired
    from mesh.proxy.main import load_workload

    me = Identity("vms", "db", DOMAIN)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = service.issuers.load_issuer()
    leaf = ca.sign_leaf(issuer, key.public_key(), me, now=dt.datetime.now(dt.UTC),
                        lifetime=dt.timedelta(seconds=1))
    # Lapsed within two seconds (X.509 times are whole seconds, compared as such).
    while dt.datetime.now(dt.UTC) <= leaf.not_valid_after_utc + dt.timedelta(seconds=1):
        await asyncio.sleep(0.05)
    (tmp_path / "tls.crt").write_bytes(ca.cert_pem(leaf) + ca.cert_pem(issuer.cert))
    ca.write_private(tmp_path / "tls.key", ca.key_pem(key))
    cfg = convert({
        "name": me.dns_name, "trustBundle": str(service.issuers.bundle),
        "server": service.url, "certFile": str(tmp_path / "tls.crt"),
        "keyFile": str(tmp_path / "tls.key")}, IdentityConfig)
    with pytest.raises(CertificateExpired, match=r"expired.*must join again: run "
                       r"`meshgate vm leave`, then `meshgate vm join` with a new token"):
        await load_workload(cfg, CollectorRegistry())


async def test_a_join_token_the_control_plane_may_not_read_names_the_binding(
        cluster: Cluster, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = _sa(cluster, "vm")
    token, _ = jointoken.mint(client.CoreV1Api(cluster.api()), namespace=ns, workload="w",
                              service_account="vm", ttl=dt.timedelta(minutes=5))

    def forbidden(*args: Any, **kwargs: Any) -> jointoken.Grant:
        raise ApiException(status=403, reason="Forbidden")

    # As on a cluster where the join-token role is not bound in the VM's namespace.
    monkeypatch.setattr(jointoken, "redeem", forbidden)
    status, body = await service.post({"csr": _csr(Identity(ns, "vm", DOMAIN))[0],
                                       "token": token})
    assert (status, body["error"]) == (503, "join-tokens-forbidden")
    assert body["message"].startswith(f"the control plane may not read join tokens in "
                                      f"namespace {ns}: bind the ClusterRole "
                                      "meshgate-control-join-tokens there (kubectl -n "
                                      f"{ns} create rolebinding")

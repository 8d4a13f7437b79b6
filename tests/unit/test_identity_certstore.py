"""CertStore without sockets: issuance, renewal timing, backoff, metrics, bundles.

Time is a fake: the store's clock is `SteppedTime.clock`, and each of its
sleeps blocks until the test lets it pass, which moves the clock forward.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from mesh.errors import ConfigError, IdentityError
from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.certstore import RENEW_JITTER, CertStore, Issued, write_back
from mesh.identity.errors import (
    CertificateExpired,
    IssuanceRefused,
    ServiceUnavailable,
    TrustSetupError,
    UntrustedChain,
)
from mesh.identity.names import Identity
from mesh.structs import convert

DOMAIN = "cluster.local"
WEB = Identity("default", "web", DOMAIN)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
DAY = timedelta(hours=24)


@dataclass
class Authority:
    """An anchor and an issuer under it."""

    anchor: ca.CertKey
    issuer: ca.CertKey

    @classmethod
    def new(cls, now: float, domain: str = DOMAIN) -> Authority:
        when = datetime.fromtimestamp(now, UTC)
        anchor = ca.new_anchor(domain, lifetime=timedelta(days=3650), now=when)
        return cls(anchor, ca.new_issuer(anchor, domain, lifetime=timedelta(days=365),
                                          now=when))

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle((self.anchor.cert,))


@dataclass
class FakeIdentityService:
    """A Requester that signs with `ca.sign_leaf`; `failures` are raised first, in order."""

    authority: Authority
    clock: Callable[[], float]
    lifetime: timedelta = DAY
    bundle: TrustBundle | None = None
    failures: list[Exception] = field(default_factory=list)
    sign_as: Identity | None = None
    sign_other_key: bool = False
    calls: int = 0
    currents: list[CertStore | None] = field(default_factory=list)

    async def certify(self, csr_pem: bytes, *, current: CertStore | None) -> Issued:
        self.calls += 1
        self.currents.append(current)
        if self.failures:
            raise self.failures.pop(0)
        identity, public = ca.csr_identity(csr_pem)
        if self.sign_other_key:
            public = ec.generate_private_key(ec.SECP256R1()).public_key()
        leaf = ca.sign_leaf(self.authority.issuer, public, self.sign_as or identity,
                            now=datetime.fromtimestamp(self.clock(), UTC),
                            lifetime=self.lifetime)
        return Issued(chain_pem=ca.cert_pem(leaf) + ca.cert_pem(self.authority.issuer.cert),
                      bundle_pem=self.bundle.to_pem() if self.bundle else None)


class SteppedTime:
    """A clock, and a sleep that waits until the test lets it pass."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._sleeps: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()
        self._pending: tuple[float, asyncio.Future[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._sleeps.put((delay, done))
        await done

    async def sleeping(self) -> float:
        """Wait (with a deadline) until the store sleeps; return how long it asked for."""
        self._pending = await asyncio.wait_for(self._sleeps.get(), 5)
        return self._pending[0]

    def wake(self) -> None:
        """Let the pending sleep end, its whole delay having passed."""
        assert self._pending is not None
        delay, done = self._pending
        self._pending = None
        self.now += delay
        done.set_result(None)


@pytest.fixture
def time_() -> SteppedTime:
    return SteppedTime(T0)


@pytest.fixture
def authority() -> Authority:
    return Authority.new(T0 - 3600)


@pytest.fixture
def service(authority: Authority, time_: SteppedTime) -> FakeIdentityService:
    return FakeIdentityService(authority, time_.clock)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def store(service: FakeIdentityService, authority: Authority, time_: SteppedTime,
                registry: CollectorRegistry) -> AsyncIterator[CertStore]:
    s = CertStore(WEB, service, bundle=authority.bundle, clock=time_.clock, sleep=time_.sleep,
                  rng=random.Random(7), registry=registry)
    yield s
    s.stop()


def refreshes(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("identity_cert_refresh_total", {"result": result}) or 0.0


def serial(s: CertStore) -> int:
    return s.certificates[0].serial_number


def anchors_in(ctx: ssl.SSLContext) -> int:
    return len(ctx.get_ca_certs())


# -- the first certificate --------------------------------------------------------------


async def test_start_obtains_a_certificate_for_the_identity(
        store: CertStore, service: FakeIdentityService, registry: CollectorRegistry) -> None:
    assert store.chain is None and store.expires_at is None
    await store.start()
    leaf, issuer = store.certificates
    assert Identity.from_certificate(leaf) == WEB == store.identity
    assert issuer == service.authority.issuer.cert
    assert store.chain == ca.cert_pem(leaf) + ca.cert_pem(issuer)
    assert store.expires_at == leaf.not_valid_after_utc.timestamp() == T0 + DAY.total_seconds()
    assert service.currents == [None]
    assert refreshes(registry, "success") == 1
    assert registry.get_sample_value("identity_cert_expiration_timestamp_seconds",
                                     {"identity": str(WEB)}) == store.expires_at
    assert ca.load_key(store.key_pem).public_key() == leaf.public_key()


async def test_start_retries_unreachable_service_and_raises_refusal(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime,
        registry: CollectorRegistry) -> None:
    service.failures = [ServiceUnavailable("identity service down"),
                        ConnectionRefusedError(111, "Connection refused"),
                        IssuanceRefused("token expired", reason="invalid-token", status=401)]
    starting = asyncio.create_task(store.start())
    first = await time_.sleeping()
    time_.wake()
    second = await time_.sleeping()
    time_.wake()
    with pytest.raises(IssuanceRefused):
        await asyncio.wait_for(starting, 5)
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0
    assert service.calls == 3  # the refusal is not retried
    assert refreshes(registry, "failure") == 3
    assert store.chain is None


async def test_stop_ends_a_start_that_is_still_retrying(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime) -> None:
    service.failures = [ServiceUnavailable("down")]
    starting = asyncio.create_task(store.start())
    await time_.sleeping()
    store.stop()
    with pytest.raises(IdentityError, match="stopped before it obtained a certificate"):
        await asyncio.wait_for(starting, 5)


@pytest.mark.parametrize("bad", ["identity", "key", "anchor"])
async def test_unusable_answers_are_refused(
        bad: str, store: CertStore, service: FakeIdentityService, time_: SteppedTime) -> None:
    if bad == "identity":
        service.sign_as = Identity("default", "api", DOMAIN)
        expected: type[IdentityError] = TrustSetupError
    elif bad == "anchor":
        service.authority = Authority.new(T0 - 3600)
        expected = UntrustedChain
    else:
        service.sign_other_key = True
        expected = TrustSetupError
    with pytest.raises(expected, match=r"answered web\.default"):
        await store.start()
    assert store.chain is None


def test_settings_are_checked(authority: Authority, service: FakeIdentityService) -> None:
    with pytest.raises(ConfigError, match="renew_at"):
        CertStore(WEB, service, bundle=authority.bundle, renew_at=1.5)
    with pytest.raises(ConfigError, match="backoff"):
        CertStore(WEB, service, bundle=authority.bundle, backoff=(5.0, 1.0))


# -- renewal ----------------------------------------------------------------------------


async def test_renews_at_seventy_percent_and_backs_off_while_unreachable(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime,
        registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.identity.certstore")
    await store.start()
    first_serial, first_key = serial(store), store.key_pem
    lifetime = DAY.total_seconds() + ca.BACKDATE.total_seconds()
    not_before = T0 - ca.BACKDATE.total_seconds()
    running = asyncio.create_task(store.run())

    due = await time_.sleeping()
    assert 0.7 - RENEW_JITTER <= (T0 + due - not_before) / lifetime <= 0.7 + RENEW_JITTER
    service.failures = [ServiceUnavailable("identity service 10.0.0.1:8080 unreachable"),
                        ServiceUnavailable("identity service 10.0.0.1:8080 unreachable")]
    time_.wake()

    backoffs = [await time_.sleeping()]
    assert refreshes(registry, "failure") == 1 and serial(store) == first_serial
    time_.wake()
    backoffs.append(await time_.sleeping())
    time_.wake()
    assert 0.25 <= backoffs[0] <= 0.5 and 0.5 <= backoffs[1] <= 1.0

    next_due = await time_.sleeping()  # renewed: the next renewal is scheduled
    assert serial(store) != first_serial
    assert store.key_pem != first_key  # a fresh key for every certificate
    assert service.currents[-1] is store  # the valid certificate may prove the identity
    assert refreshes(registry, "success") == 2 and refreshes(registry, "failure") == 2
    assert registry.get_sample_value("identity_cert_expiration_timestamp_seconds",
                                     {"identity": str(WEB)}) == store.expires_at
    assert store.expires_at == int(time_.now + DAY.total_seconds())  # whole seconds in X.509
    assert abs(next_due - 0.7 * lifetime) <= RENEW_JITTER * lifetime + 20

    failures = [r.getMessage() for r in caplog.records if "renewal failed" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].startswith(f"identity renewal failed identity={WEB} attempt=1 "
                                  "retry_in=")
    assert "cause=ServiceUnavailable: identity service 10.0.0.1:8080 unreachable" in failures[0]
    assert "attempt=2" in failures[1]

    store.stop()
    await asyncio.wait_for(running, 5)


async def test_renewal_time_is_jittered(
        authority: Authority, service: FakeIdentityService, time_: SteppedTime) -> None:
    dues = set()
    for seed in range(5):
        s = CertStore(WEB, service, bundle=authority.bundle, clock=time_.clock,
                      sleep=time_.sleep, rng=random.Random(seed))
        await s.start()
        running = asyncio.create_task(s.run())
        dues.add(round(await time_.sleeping()))
        s.stop()
        await asyncio.wait_for(running, 5)
    assert len(dues) == 5


async def test_backoff_grows_to_the_longest_delay(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime) -> None:
    service.failures = [ServiceUnavailable("down") for _ in range(10)]
    starting = asyncio.create_task(store.start())
    delays = []
    for _ in range(10):
        delays.append(await time_.sleeping())
        time_.wake()
    await asyncio.wait_for(starting, 5)
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling, (attempt, delays)


async def test_a_lapsed_certificate_is_logged_as_an_error(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime,
        caplog: pytest.LogCaptureFixture) -> None:
    await store.start()
    running = asyncio.create_task(store.run())
    await time_.sleeping()
    time_.now += DAY.total_seconds()  # the service stays away past the expiry
    service.failures = [ServiceUnavailable("down")]
    time_.wake()
    await time_.sleeping()
    record = next(r for r in caplog.records if "renewal failed" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert "expires_in=-" in record.getMessage()
    store.stop()
    await asyncio.wait_for(running, 5)


async def test_refusal_during_renewal_is_raised_with_the_certificate_kept(
        store: CertStore, service: FakeIdentityService, time_: SteppedTime) -> None:
    await store.start()
    kept = store.chain
    running = asyncio.create_task(store.run())
    await time_.sleeping()
    service.failures = [IssuanceRefused("no", reason="invalid-token", status=401)]
    time_.wake()
    with pytest.raises(IssuanceRefused):
        await asyncio.wait_for(running, 5)
    assert store.chain == kept


# -- contexts, bundles, listeners ---------------------------------------------------------


async def test_contexts_are_long_lived_and_an_added_anchor_joins_them(
        store: CertStore, service: FakeIdentityService, authority: Authority) -> None:
    await store.start()
    server, client = store.server_context(), store.client_context()
    assert anchors_in(server) == anchors_in(client) == 1
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == server.maximum_version == ssl.TLSVersion.TLSv1_3
    newcomer = Authority.new(T0 - 3600)
    service.bundle = authority.bundle.with_anchor(newcomer.anchor.cert)
    await store.renew()
    assert store.server_context() is server and store.client_context() is client
    assert anchors_in(server) == anchors_in(client) == 2
    assert store.bundle == service.bundle


async def test_a_removed_anchor_gives_fresh_contexts(
        store: CertStore, service: FakeIdentityService, authority: Authority) -> None:
    old = Authority.new(T0 - 3600)
    service.bundle = authority.bundle.with_anchor(old.anchor.cert)
    await store.start()
    server, client = store.server_context(), store.client_context()
    assert anchors_in(server) == 2
    service.bundle = authority.bundle
    await store.renew()
    assert store.server_context() is not server and store.client_context() is not client
    assert anchors_in(store.server_context()) == anchors_in(store.client_context()) == 1
    assert anchors_in(server) == 2  # the old contexts still serve their connections


async def test_listeners_hear_of_every_new_certificate(
        store: CertStore, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []

    def broken(_: CertStore) -> None:
        raise RuntimeError("listener bug")

    store.on_change += [broken, lambda s: seen.append(serial(s))]
    await store.start()
    await store.renew()
    assert len(seen) == 2 and seen[0] != seen[1]
    assert any("identity change listener failed" in r.getMessage() for r in caplog.records)


async def test_stores_may_share_a_registry(
        authority: Authority, service: FakeIdentityService, registry: CollectorRegistry,
        time_: SteppedTime) -> None:
    api = Identity("default", "api", DOMAIN)
    one = CertStore(WEB, service, bundle=authority.bundle, clock=time_.clock, registry=registry)
    two = CertStore(api, service, bundle=authority.bundle, clock=time_.clock, registry=registry)
    await one.start()
    await two.start()
    for s in (one, two):
        assert registry.get_sample_value("identity_cert_expiration_timestamp_seconds",
                                         {"identity": str(s.identity)}) == s.expires_at
    assert refreshes(registry, "success") == 2


# -- held certificate files (a VM's) ----------------------------------------------------------


def issue(authority: Authority, identity: Identity, *, now: float,
          lifetime: timedelta = DAY) -> tuple[bytes, bytes]:
    """A chain and key as `meshgate vm join` leaves them on disk."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(authority.issuer, key.public_key(), identity,
                        now=datetime.fromtimestamp(now, UTC), lifetime=lifetime)
    return ca.cert_pem(leaf) + ca.cert_pem(authority.issuer.cert), ca.key_pem(key)


async def test_adopted_files_are_renewed_by_certificate_and_written_back(
        store: CertStore, service: FakeIdentityService, authority: Authority,
        time_: SteppedTime, registry: CollectorRegistry, tmp_path: Path) -> None:
    issued_at = T0 - 6 * 3600  # the VM was down for a while
    chain, key = issue(authority, WEB, now=issued_at)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(chain)
    ca.write_private(key_file, key)
    store.adopt(cert_file.read_bytes(), key_file.read_bytes())
    store.on_change.append(write_back(cert_file, key_file))
    assert store.chain == chain and store.key_pem == ca.key_pem(ca.load_key(key))
    assert service.calls == 0 and refreshes(registry, "success") == 0
    running = asyncio.create_task(store.run())

    due = await time_.sleeping()  # at 70 % of the held certificate's life, not of now's
    assert abs(time_.now + due - (issued_at + 0.7 * DAY.total_seconds())) <= \
        RENEW_JITTER * DAY.total_seconds() + 20
    time_.wake()
    await time_.sleeping()  # renewed; the next renewal is scheduled
    assert service.currents == [store]  # proven by the held certificate
    assert store.chain != chain
    assert cert_file.read_bytes() == store.chain and key_file.read_bytes() == store.key_pem
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    restarted = CertStore(WEB, service, bundle=authority.bundle, clock=time_.clock)
    restarted.adopt(cert_file.read_bytes(), key_file.read_bytes())  # a reboot
    assert restarted.certificates == store.certificates
    store.stop()
    await asyncio.wait_for(running, 5)


async def test_a_failed_write_back_is_logged_and_the_store_keeps_serving(
        store: CertStore, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    store.on_change.append(write_back(tmp_path / "gone" / "tls.crt",
                                      tmp_path / "gone" / "tls.key"))
    await store.start()
    assert store.chain is not None
    assert any("identity files not written" in r.getMessage() and "cause=" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("case", ["expired", "other-identity", "other-key", "untrusted"])
def test_unusable_held_files_are_refused(
        case: str, store: CertStore, authority: Authority) -> None:
    lifetime = timedelta(minutes=10) if case == "expired" else DAY
    signer = Authority.new(T0 - 7200) if case == "untrusted" else authority
    chain, key = issue(signer, Identity("default", "api", DOMAIN) if case == "other-identity"
                       else WEB, now=T0 - 3600, lifetime=lifetime)
    if case == "other-key":
        key = ca.key_pem(ec.generate_private_key(ec.SECP256R1()))
    expected: type[IdentityError] = {"expired": CertificateExpired,
                                     "untrusted": UntrustedChain}.get(case, TrustSetupError)
    with pytest.raises(expected, match=rf"certificate held for {WEB} is") as raised:
        store.adopt(chain, key)
    assert store.chain is None
    if case == "expired":
        assert "expired" in str(raised.value)
    if case == "other-key":
        assert "do not belong together" in str(raised.value)


@pytest.mark.parametrize(("fields", "error"), [
    ({"certFile": "c", "keyFile": "k"}, None),
    ({"server": "https://id:8080", "tokenFile": "t"}, None),
    ({"server": "https://id:8080", "certFile": "c", "keyFile": "k"}, None),
    ({"server": "https://id:8080", "certFile": "c", "keyFile": "k", "tokenFile": "t"}, None),
    ({"server": "https://id:8080"}, "server needs tokenFile"),
    ({"server": "https://id:8080", "certFile": "c"}, "together"),
    ({"tokenFile": "t"}, "give certFile and keyFile"),
    ({"certFile": "c", "keyFile": "k", "tokenFile": "t"}, "give certFile and keyFile"),
])
def test_identity_config_sources(fields: dict[str, str], error: str | None) -> None:
    from msgspec import ValidationError

    from mesh.config import IdentityConfig

    doc = {"name": WEB.dns_name, "trustBundle": "b", **fields}
    if error is None:
        cfg = convert(doc, IdentityConfig)
        assert cfg.renewed_files == ("server" in fields and "certFile" in fields)
    else:
        with pytest.raises(ValidationError, match=error):
            convert(doc, IdentityConfig)

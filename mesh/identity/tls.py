"""TLS between proxies: contexts, loading a workload identity, and peer checks.

Contexts speak TLS 1.3 only, with ECDHE over P-256 and ALPN
``transport.l5d.io/v1``, and both sides verify the other against a trust
bundle (a server requires a client certificate). OpenSSL does not check host
names: `check_peer` checks the peer's identity explicitly, so that a mismatch
is reported with both names. `explain_handshake_failure` turns OpenSSL's
failures into `IdentityError` subclasses that say which side failed, which
identity was expected and which was presented, until when the chain is valid,
and which trust anchor was missing; `explain_dial_failure` does so for a
server this side dialled, fetching the certificate it refused without blocking.

Private keys never touch a file system: `load_identity` hands them to OpenSSL
through anonymous memory files (``memfd_create``).

Throughout, ``side`` is the role of the *peer* whose certificate is judged:
``"server"`` when this process dialled out, ``"client"`` when it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from mesh.errors import IdentityError
from mesh.identity.bundle import TrustBundle, rfc3339
from mesh.identity.errors import (
    CertificateExpired,
    PeerIdentityMismatch,
    TrustSetupError,
    UntrustedChain,
)
from mesh.identity.names import Identity, InvalidName, presented_name

ALPN = "transport.l5d.io/v1"
CURVE = "prime256v1"  # OpenSSL's name for P-256; on OpenSSL 3 it is the only group offered

# X509_V_ERR_* codes (openssl/x509_vfy.h) that ssl.SSLCertVerificationError carries.
_NOT_YET_VALID = 9
_EXPIRED = 10
# _ssl.ENCODING_DER, for the certificates of the private chain getters of Python < 3.13.
_ENCODING_DER = 2

PeerTLS = ssl.SSLObject | ssl.SSLSocket


# -- contexts ------------------------------------------------------------------------


def server_context(bundle: TrustBundle) -> ssl.SSLContext:
    """A context for accepting mesh connections; load an identity before serving.

    It sends one session ticket per connection, not OpenSSL's two: a dialling
    proxy keeps one ticket per peer for hours (`ResumingContext`), and each
    ticket costs the server ~0.18 ms of CPU to issue (most of it copying and
    encoding the session with the client's certificate).
    """
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, bundle)
    ctx.num_tickets = 1
    return ctx


def client_context(bundle: TrustBundle) -> ssl.SSLContext:
    """A context for dialling mesh peers; load an identity before dialling. It resumes
    TLS sessions with peers it has met (`ResumingContext`)."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, bundle, cls=ResumingContext)


class ResumingContext(ssl.SSLContext):
    """A client context that resumes TLS 1.3 sessions with the peers it has met.

    A full mTLS handshake costs two signatures and their checks on each side;
    resuming from a session ticket costs neither, which roughly doubles the
    rate of new connections between two proxies. The event loop builds each
    connection's TLS object with `wrap_bio` and cannot pass a session itself,
    so this context does: it takes one ticket from a connection to a server
    name (the peer's identity, so a session is only ever offered to the
    identity it was made with) and offers it to every later connection to that
    name for `MAX_AGE` seconds (at most 90 % of the ticket's own lifetime);
    OpenSSL's servers accept a TLS 1.3 ticket more than once outside 0-RTT.
    Loading a new identity (a renewal) forgets every ticket, as does a new
    context (after a trust bundle change). A resumed connection shows the
    peer's certificate from the full handshake, which may be the one before
    the peer's latest renewal: still valid, since renewal happens long before
    expiry.

    A ticket is read (``SSLObject.session``) once per server name per
    `MAX_AGE`, never once per connection: CPython 3.11, and 3.12 before
    3.12.7, leak a copy of the session (about 7 KB with the peer's chain) on
    every read of that attribute (CPython gh-116810), which made the proxy
    grow by that much per connection. While no ticket is held, the next
    connection reads the ticket of the last full handshake; a read that finds
    none (the ticket follows the handshake, so a burst of connections may
    look too early) doubles the wait before the next, so a peer that issues
    no tickets costs a read an hour, not one per connection.
    """

    MAX_AGE = 6480.0
    """Seconds a ticket is offered: 90 % of the 7,200 s OpenSSL's servers grant."""
    FIRST_WAIT = 0.05
    """Seconds to wait after a read that found no ticket; doubled after each such read."""
    LONGEST_WAIT = 3600.0

    _peers: dict[str, _Tickets]

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        name = server_hostname.decode() if isinstance(server_hostname, bytes) else \
            server_hostname
        tickets = self._tickets(name) if name and not server_side else None
        if session is None and tickets is not None:
            session = tickets.session_for(time.monotonic())
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if tickets is not None and session is None and tickets.full is None:
            tickets.full = obj  # where the next ticket comes from
        return obj

    def load_cert_chain(self, certfile: Any, keyfile: Any = None,
                        password: Any = None) -> None:
        super().load_cert_chain(certfile, keyfile, password)
        self._peers = {}  # sessions of the old identity

    def _tickets(self, name: str) -> _Tickets:
        try:
            peers = self._peers
        except AttributeError:
            peers = self._peers = {}
        tickets = peers.get(name)
        if tickets is None:
            tickets = peers[name] = _Tickets(self)
        return tickets


class _Tickets:
    """The session ticket held for one server name, or the full handshake it will be
    read from (kept until read, even once closed: its session outlives it)."""

    __slots__ = ("ctx", "full", "not_before", "session", "taken", "wait")

    def __init__(self, ctx: ResumingContext) -> None:
        self.ctx = ctx
        self.session: ssl.SSLSession | None = None
        self.taken = 0.0
        self.full: ssl.SSLObject | None = None
        self.not_before = 0.0
        self.wait = ctx.FIRST_WAIT

    def session_for(self, now: float) -> ssl.SSLSession | None:
        session = self.session
        if session is not None:
            if now - self.taken < min(session.timeout * 0.9, self.ctx.MAX_AGE):
                return session
            self.session = None
        full = self.full
        if full is None or now < self.not_before:
            return None
        self.full = None
        fresh = None
        with contextlib.suppress(ValueError, ssl.SSLError):
            fresh = full.session  # one read, one leaked copy on CPython 3.11
        if fresh is None or not fresh.has_ticket:
            self.not_before = now + self.wait
            self.wait = min(self.wait * 2, self.ctx.LONGEST_WAIT)
            return None
        self.session, self.taken, self.wait = fresh, now, self.ctx.FIRST_WAIT
        return fresh


def _context(protocol: ssl._SSLMethod, bundle: TrustBundle | None,
             cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    ctx = cls(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve(CURVE)
    ctx.set_alpn_protocols([ALPN])
    # Identity is checked by check_peer, which can name both identities on a mismatch.
    ctx.check_hostname = False
    if bundle is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=bundle.ssl_cadata())
    return ctx


def load_identity(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Make ``ctx`` present ``chain_pem`` (leaf first) with the private key ``key_pem``.

    ``load_cert_chain`` only reads paths, so both go through anonymous memory
    files that vanish when closed; the key is never written to a disk. Loading
    into a context that is in use is safe: each connection copies the
    certificate and key when it starts, so connections already open, and
    handshakes already under way, keep the previous ones.
    """
    with _memory_file(chain_pem) as chain_path, _memory_file(key_pem) as key_path:
        try:
            ctx.load_cert_chain(chain_path, key_path, password=_no_password)
        except (ssl.SSLError, OSError) as e:
            raise TrustSetupError(
                f"cannot use the certificate chain and key: {_ssl_reason(e)}; the chain must "
                "be PEM certificates, leaf first, and the key the unencrypted PEM private key "
                "of the leaf") from e


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TrustSetupError("the private key is encrypted; meshgate keys are held in memory "
                          "unencrypted")


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("meshgate-identity", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        base = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        yield f"{base}/{fd}"
    finally:
        os.close(fd)


# -- the peer ------------------------------------------------------------------------


def peer_chain(ssl_object: PeerTLS, *, verified: bool = True) -> list[x509.Certificate]:
    """The peer's certificates, leaf first.

    With ``verified`` the chain OpenSSL built (leaf to anchor), else the one the
    peer sent. Python 3.13 has public getters; 3.11 and 3.12 have them only on
    the private ``_sslobj``. Where neither exists, the leaf alone.
    """
    name = "get_verified_chain" if verified else "get_unverified_chain"
    getter = getattr(ssl_object, name, None) or getattr(
        getattr(ssl_object, "_sslobj", None), name, None)
    ders: list[bytes] = []
    if getter is not None:
        for cert in getter() or []:
            ders.append(cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER))
    if not ders:
        leaf = ssl_object.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(der) for der in ders]


def peer_identity(ssl_object: PeerTLS) -> Identity:
    """The identity named by the peer's verified leaf certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise UntrustedChain("the peer presented no certificate")
    return Identity.from_certificate(x509.load_der_x509_certificate(der))


def check_peer(ssl_object: PeerTLS, *, expected: Identity | None, side: str,
               peer: str) -> Identity:
    """The peer's identity, checked against ``expected`` (``None``: any mesh identity).

    Raises `PeerIdentityMismatch` naming both identities and the chain's expiry.
    OpenSSL has verified the chain; the identity is read from the leaf, and the
    leaves already met are remembered (`_LEAVES`), so a connection from a known
    peer costs a lookup instead of parsing its chain (~0.25 ms).
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    got = _LEAVES.get(leaf) if leaf else None
    if got is not None and (expected is None or got == expected):
        return got
    chain = peer_chain(ssl_object)
    if not chain:
        raise UntrustedChain(f"{side} {peer} presented no certificate; meshed peers must "
                             "present their workload certificate")
    until = rfc3339(min(c.not_valid_after_utc for c in chain))
    try:
        got = Identity.from_certificate(chain[0])
    except InvalidName as e:
        wanted = f", expected {expected}" if expected is not None else ""
        raise PeerIdentityMismatch(
            f"{side} {peer} presented {presented_name(chain[0])}, which is no mesh identity"
            f"{wanted}; chain valid until {until}") from e
    if leaf:
        _LEAVES.remember(leaf, got)
    if expected is not None and got != expected:
        raise PeerIdentityMismatch(f"{side} {peer} presented {got}, expected {expected}; "
                                   f"chain valid until {until}")
    return got


class _Leaves:
    """Identities of the leaf certificates met, by their DER bytes; at most `SIZE`
    (then forgotten all at once: renewals and new peers refill it)."""

    SIZE = 4096

    def __init__(self) -> None:
        self._names: dict[bytes, Identity] = {}

    def get(self, der: bytes) -> Identity | None:
        return self._names.get(der)

    def remember(self, der: bytes, identity: Identity) -> None:
        if len(self._names) >= self.SIZE:
            self._names.clear()
        self._names[der] = identity


_LEAVES = _Leaves()


async def fetch_peer_leaf(host: str, port: int, *, timeout: float) -> list[x509.Certificate]:
    """The certificates a server presents (leaf first), fetched without verifying them.

    Only for explaining a failed handshake: Python's ssl module keeps no
    certificate of a handshake that failed verification, so this dials again
    with verification off and the same ALPN. The server ends that handshake
    itself, since no client certificate is sent.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, None)
    async with asyncio.timeout(timeout):
        _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        return peer_chain(sslobj, verified=False) if sslobj is not None else []
    finally:
        writer.close()
        # The server's alert for the missing client certificate may surface here.
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(timeout):
                await writer.wait_closed()


# -- explaining failures -------------------------------------------------------------


def context_bundle(ctx: ssl.SSLContext) -> TrustBundle:
    """The trust anchors ``ctx`` verifies peers with: what a handshake under it trusted."""
    return TrustBundle(tuple(x509.load_der_x509_certificate(der)
                             for der in ctx.get_ca_certs(binary_form=True)))


async def explain_dial_failure(err: ssl.SSLError, *, host: str, port: int, peer: str,
                               expected: Identity | None, bundle: TrustBundle,
                               timeout: float) -> IdentityError:
    """`explain_handshake_failure` for a server this side dialled at ``host:port``.

    When this side refused the server's certificate, the certificate is fetched
    again (`fetch_peer_leaf`, within ``timeout``) before the explanation is
    written, so that no event loop waits on a blocking re-dial.
    """
    chain: list[x509.Certificate] = []
    failure: BaseException | None = None
    if isinstance(err, ssl.SSLCertVerificationError):
        try:
            async with asyncio.timeout(timeout):
                chain = await fetch_peer_leaf(host, port, timeout=timeout)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as e:
            failure = e

    def fetched() -> list[x509.Certificate]:
        if failure is not None:
            raise failure
        return chain

    return explain_handshake_failure(err, side="server", peer=peer, expected=expected,
                                     bundle=bundle, diagnose=fetched)


def explain_handshake_failure(err: ssl.SSLError, *, side: str, peer: str,
                              expected: Identity | None, bundle: TrustBundle,
                              diagnose: Callable[[], list[x509.Certificate]] | None,
                              now: datetime | None = None) -> IdentityError:
    """An `IdentityError` saying in words why the handshake with ``peer`` failed.

    ``diagnose`` returns the certificates the peer presents (see
    `fetch_peer_leaf`; it is called at most once, and a failure of it only
    makes the message less precise). Without it the message carries what
    OpenSSL said, with the side, peer and expected identity.
    """
    when = now or datetime.now(UTC)
    who = f"{side} {peer}"
    wanted = f"expected {expected}" if expected is not None else "any mesh identity expected"
    if isinstance(err, ssl.SSLCertVerificationError):
        chain, why_not = _diagnose(diagnose)
        if chain:
            return _explain_chain(chain, who=who, wanted=wanted, expected=expected,
                                  bundle=bundle, now=when, openssl=_verify_message(err))
        return _explain_verify_code(err, who=who, wanted=wanted, bundle=bundle, now=when,
                                    note=why_not)
    return _explain_alert(err, who=who, expected=expected, now=when)


def _diagnose(diagnose: Callable[[], list[x509.Certificate]] | None
              ) -> tuple[list[x509.Certificate], str]:
    if diagnose is None:
        return [], ""
    try:
        return diagnose(), ""
    except (OSError, ssl.SSLError, TimeoutError, ValueError, IdentityError) as e:
        # The explanation is still worth giving without the peer's certificate.
        return [], f"; fetching its certificate to say more failed: {type(e).__name__}: {e}"


def _explain_chain(chain: list[x509.Certificate], *, who: str, wanted: str,
                   expected: Identity | None, bundle: TrustBundle, now: datetime,
                   openssl: str) -> IdentityError:
    leaf = chain[0]
    name = presented_name(leaf)
    head = (f"{who} presented {name} (valid from {rfc3339(leaf.not_valid_before_utc)} until "
            f"{rfc3339(leaf.not_valid_after_utc)}), {wanted}")
    if expected is not None and name != str(expected):
        head += " — it is also the wrong identity"
    try:
        anchor = bundle.verify(chain, now=now)
    except CertificateExpired as e:
        return CertificateExpired(f"{head}: {e}{_skew_hint(str(e), now)}")
    except UntrustedChain as e:
        return UntrustedChain(f"{head}: {e}")
    # The chain verifies here: OpenSSL objected to something else (or the peer changed).
    return UntrustedChain(f"{head}: OpenSSL refused it ({openssl}) although it leads to "
                          f"anchor {bundle.describe(anchor)}")


def _explain_verify_code(err: ssl.SSLCertVerificationError, *, who: str, wanted: str,
                         bundle: TrustBundle, now: datetime, note: str) -> IdentityError:
    message = _verify_message(err)
    if getattr(err, "verify_code", None) in (_EXPIRED, _NOT_YET_VALID):
        return CertificateExpired(
            f"{who} presented a certificate that is expired or not yet valid by this "
            f"host's clock (OpenSSL: {message}; now {rfc3339(now)}), {wanted}; if the "
            f"peer renewed recently, compare the clocks of both hosts (clock skew) before "
            f"suspecting renewal{note}")
    anchors = ", ".join(bundle.describe(a) for a in bundle.anchors)
    return UntrustedChain(
        f"{who} presented a certificate this side does not trust ({message}), {wanted}; "
        f"the trust bundle holds {anchors}; the peer's chain must lead to one of them — add "
        f"its anchor to the bundle (meshgate identity rotate) or re-issue its certificate"
        f"{note}")


# TLS alerts and OpenSSL reasons seen when the handshake fails for a reason this side
# did not verify itself, keyed by a fragment of ``SSLError.reason``.
_REFUSED = "refused this workload's certificate"
_ALERTS: list[tuple[str, type[IdentityError], str]] = [
    ("CERTIFICATE_EXPIRED", CertificateExpired,
     f"{_REFUSED} as expired or not yet valid (TLS alert {{alert}}); check that this "
     "workload renews its certificate, and compare the clocks of both hosts (clock skew, "
     "now {now} here)"),
    ("UNKNOWN_CA", UntrustedChain,
     f"{_REFUSED}: its trust bundle lacks the anchor this workload's chain leads to (TLS "
     "alert {alert}); add this cluster's anchor to the peer's bundle"),
    ("BAD_CERTIFICATE", UntrustedChain,
     f"{_REFUSED} (TLS alert {{alert}}); its trust bundle may lack this workload's anchor"),
    ("UNSUPPORTED_CERTIFICATE", UntrustedChain,
     f"{_REFUSED} as unfit for the purpose (TLS alert {{alert}})"),
    ("CERTIFICATE_REQUIRED", UntrustedChain,
     "requires a client certificate and none was sent (TLS alert {alert}); this workload "
     "has no identity loaded yet"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", UntrustedChain,
     "presented no certificate; meshed clients must present their workload certificate"),
    ("NO_APPLICATION_PROTOCOL", IdentityError,
     f"does not speak ALPN {ALPN} (TLS alert {{alert}}); it is not a meshgate proxy port"),
    ("PROTOCOL_VERSION", IdentityError,
     "does not speak TLS 1.3 (TLS alert {alert}); meshed peers use TLS 1.3 only"),
    ("UNSUPPORTED_PROTOCOL", IdentityError,
     "does not speak TLS 1.3 ({alert}); meshed peers use TLS 1.3 only"),
    ("NO_SUITABLE_KEY_SHARE", IdentityError,
     "shares no key exchange group with this side ({alert}); meshed peers use P-256"),
    ("WRONG_VERSION_NUMBER", IdentityError,
     "did not answer in TLS ({alert}); is it a plain-text port?"),
    ("HTTP_REQUEST", IdentityError,
     "sent plain-text HTTP, not TLS ({alert}); mesh ports take mTLS from proxies only"),
]


def _explain_alert(err: ssl.SSLError, *, who: str, expected: Identity | None,
                   now: datetime) -> IdentityError:
    reason = getattr(err, "reason", None) or ""
    wanted = f" (expected {expected})" if expected is not None else ""
    for fragment, kind, text in _ALERTS:
        if fragment in reason:
            detail = text.format(alert=_words(reason), now=rfc3339(now))
            return kind(f"{who}{wanted} {detail}")
    return IdentityError(f"TLS handshake with {who}{wanted} failed: {_ssl_reason(err)}")


def _verify_message(err: ssl.SSLCertVerificationError) -> str:
    return str(getattr(err, "verify_message", None) or getattr(err, "reason", None) or err)


def _ssl_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(err, ssl.SSLError) and reason:
        return f"{_words(reason)} ({getattr(err, 'library', None) or 'SSL'})"
    return f"{type(err).__name__}: {err}"


def _words(reason: str) -> str:
    """OpenSSL's ``TLSV1_ALERT_UNKNOWN_CA`` as ``tlsv1 alert unknown ca``."""
    return reason.lower().replace("_", " ")


def _skew_hint(message: str, now: datetime) -> str:
    if "clock" in message:
        return ""
    return (f"; if the peer renewed recently, compare the clocks of both hosts (clock skew: "
            f"it is {rfc3339(now)} here)")

"""Benchmark caller assertions: what a connection through a gateway pays for one.

Per connection the caller's proxy asks `ClientCredentials.assertion_for` (a signature
once per target and lifetime, a dictionary lookup otherwise) and the target's
`AssertionVerifier.check` (a chain verification and an ECDSA verification the first
time an assertion is seen, a SHA-256 digest and a replay-cache lookup afterwards).
Prints each cost in microseconds of CPU, next to a full TLS 1.3 mTLS handshake
measured in the same run, and the bytes the assertion adds to the transport header.

    .venv/bin/python bench/assertion.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import ssl
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import ca, tls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.proxy.assertion import (
    AssertionVerifier,
    ClientCredentials,
    ReplayCache,
    sign_assertion,
    verify_assertion,
)
from mesh.proxy.transport_header import TransportHeader

DOMAIN = "cluster.local"
TARGET = "web.default.svc.cluster.local"


class Workload:
    def __init__(self, bundle: TrustBundle, issuer: ca.CertKey, name: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self.identity = Identity("default", name, DOMAIN)
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        leaf = ca.sign_leaf(issuer, self.private_key.public_key(), self.identity, now=now)
        self.certificates = (leaf, issuer.cert)
        chain_pem = ca.cert_pem(leaf) + ca.cert_pem(issuer.cert)
        self.client = tls.client_context(bundle)
        self.server = tls.server_context(bundle)
        for ctx in (self.client, self.server):
            tls.load_identity(ctx, chain_pem, ca.key_pem(self.private_key))

    def client_context(self) -> ssl.SSLContext:
        return self.client


def per_call(rounds: int, fn: Callable[[int], object]) -> float:
    """CPU microseconds per call of fn(i)."""
    start = time.process_time()
    for i in range(rounds):
        fn(i)
    return (time.process_time() - start) / rounds * 1e6


def handshake(client: Workload, server: Workload) -> None:
    """One TLS 1.3 mTLS handshake over memory BIOs: both sides' CPU."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.client.wrap_bio(c_in, c_out, server_hostname=server.identity.dns_name)
    s = server.server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    while not all(done):
        for i, (obj, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    now = dt.datetime.now(dt.UTC)
    anchor = ca.new_anchor(DOMAIN, lifetime=dt.timedelta(days=1), now=now)
    issuer = ca.new_issuer(anchor, DOMAIN, lifetime=dt.timedelta(days=1), now=now)
    bundle = TrustBundle((anchor.cert,))
    caller, target = Workload(bundle, issuer, "client"), Workload(bundle, issuer, "web")
    chain = caller.certificates
    t = time.time()

    sign = per_call(rounds, lambda i: sign_assertion(
        caller.private_key, chain, caller=str(caller.identity), authority=TARGET, now=t))
    creds = ClientCredentials(caller)
    creds.assertion_for(TARGET)
    cached = per_call(rounds * 10, lambda i: creds.assertion_for(TARGET))
    assertion = creds.assertion_for(TARGET)
    verify = per_call(rounds, lambda i: verify_assertion(
        assertion, bundle=bundle, authority=TARGET, now=time.time()))
    verifier = AssertionVerifier(lambda: bundle, replay=ReplayCache())
    verifier.check(assertion, authority=TARGET, peer="gateway")
    verified = per_call(rounds * 10, lambda i: verifier.check(
        assertion, authority=TARGET, peer="gateway"))
    fresh = [sign_assertion(caller.private_key, chain, caller=str(caller.identity),
                            authority=TARGET, now=t, nonce=os.urandom(16))
             for _ in range(rounds)]
    first_seen = per_call(rounds, lambda i: verifier.check(
        fresh[i], authority=TARGET, peer="gateway"))
    tls_cpu = per_call(max(rounds // 10, 50), lambda i: handshake(caller, target))
    plain = len(TransportHeader(port=80, name=TARGET).encode())
    with_assertion = len(TransportHeader(port=80, name=TARGET, assertion=assertion).encode())

    print(f"rounds {rounds}; CPU microseconds per operation")
    print(f"  sign (no cache)                      {sign:8.1f}")
    print(f"  assertion_for, cached                {cached:8.2f}")
    print(f"  verify: chain + signature            {verify:8.1f}")
    print(f"  verifier, new assertion (+ replay)   {first_seen:8.1f}")
    print(f"  verifier, assertion seen before      {verified:8.2f}")
    print(f"  TLS 1.3 mTLS handshake, both sides   {tls_cpu:8.1f}")
    print(f"  per connection, caller (cached)      {cached / tls_cpu * 100:7.2f}% of a handshake")
    print(f"  per connection, target (seen before) {verified / tls_cpu * 100:7.2f}% of a handshake")
    print(f"  header bytes: {plain} without, {with_assertion} with the assertion")


if __name__ == "__main__":
    main()

"""The ``meshgate identity`` commands."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mesh import cliargs
from mesh.errors import ConfigError
from mesh.identity import ca
from mesh.identity.ca import IssuerDir
from mesh.identity.names import Identity
from mesh.identity.rotation import NotYet, Rotation


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def add_identity_commands(commands: Any) -> None:
    identity = commands.add_parser("identity", help="trust anchors, issuers and certificates")
    sub = identity.add_subparsers(dest="identity_command", required=True)

    init = sub.add_parser("init", help="create a trust anchor and an issuer")
    init.add_argument("--trust-domain", required=True)
    init.add_argument("--out", required=True, type=Path)
    init.add_argument("--anchor-lifetime", type=cliargs.duration, default=dt.timedelta(days=3650))
    init.add_argument("--issuer-lifetime", type=cliargs.duration, default=dt.timedelta(days=365))
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=_init)

    serve = sub.add_parser("serve", help="run the identity service")
    serve.add_argument("--kubeconfig", required=True, type=Path)
    serve.add_argument("--issuer-dir", required=True, type=Path)
    serve.add_argument("--listen", default="127.0.0.1:8443")
    serve.add_argument("--leaf-lifetime", type=cliargs.duration, default=dt.timedelta(hours=24))
    serve.add_argument("--control-namespace", default="meshgate")
    serve.set_defaults(func=_serve)

    certify = sub.add_parser("certify", help="request one certificate and write it out")
    certify.add_argument("--server", required=True, help="https://HOST:PORT of the service")
    certify.add_argument("--ca-bundle", required=True, type=Path)
    certify.add_argument("--token-file", required=True, type=Path)
    certify.add_argument("--name", required=True, help="the identity's DNS name")
    certify.add_argument("--out", required=True, type=Path)
    certify.set_defaults(func=_certify)

    rotate = sub.add_parser("rotate", help="rotate the trust anchor, one checked step at a time")
    rotate.add_argument("step", choices=["status", "add-anchor", "reissue-issuer",
                                         "remove-anchor"])
    rotate.add_argument("--dir", required=True, type=Path, help="the issuer directory")
    rotate.add_argument("--leaf-lifetime", type=cliargs.duration, default=dt.timedelta(hours=24),
                        help="the service's --leaf-lifetime: how long a step takes to spread")
    rotate.add_argument("--anchor-lifetime", type=cliargs.duration, default=dt.timedelta(days=3650))
    rotate.add_argument("--issuer-lifetime", type=cliargs.duration, default=dt.timedelta(days=365))
    rotate.add_argument("--wait", action="store_true",
                        help="wait until the step is safe instead of refusing")
    rotate.add_argument("--force", action="store_true",
                        help="take the step now even if workloads may not have caught up")
    rotate.set_defaults(func=_rotate)


def _trust_domain(directory: IssuerDir) -> str:
    anchor = directory.load_anchor_cert()
    domain = ca.anchor_trust_domain(anchor)
    if not domain:
        raise ConfigError(f"{directory.path}/anchor.crt does not name a trust domain "
                          f"(CN {anchor.subject.rfc4514_string()!r}); recreate it with "
                          "`meshgate identity init`")
    return domain


def _init(args: argparse.Namespace) -> int:
    directory = IssuerDir(args.out)
    directory.init(args.trust_domain, anchor_lifetime=args.anchor_lifetime,
                   issuer_lifetime=args.issuer_lifetime, now=_now(), force=args.force)
    print(f"trust anchor and issuer for {args.trust_domain} written to {args.out}")
    print(f"  trust bundle (give this to every workload): {args.out / 'trust-bundle.pem'}")
    print(f"  keep {args.out / 'anchor.key'} offline once the issuer exists")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web  # the identity service's process only: proxies never load it

    from mesh.identity.service import IdentityService
    from mesh.kube import api_client

    host, _, port = args.listen.rpartition(":")
    directory = IssuerDir(args.issuer_dir)
    service = IdentityService(args.issuer_dir, api_client(args.kubeconfig),
                              trust_domain=_trust_domain(directory),
                              control_ns=args.control_namespace,
                              leaf_lifetime=args.leaf_lifetime)

    async def run() -> None:
        ctx = service.server_context()
        runner = web.AppRunner(service.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host or "127.0.0.1", int(port or 8443), ssl_context=ctx)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {args.listen}: {e.strerror or e}; choose "
                              "another address with --listen") from e
        print(f"identity service for {service.trust_domain} serving at {site.name} as "
              f"{service.identity}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        maintain = asyncio.create_task(service.maintain())
        try:
            await stop.wait()
        finally:
            maintain.cancel()
            await runner.cleanup()

    asyncio.run(run())
    return 0


def _certify(args: argparse.Namespace) -> int:
    from mesh.identity.client import certify_once

    identity = Identity.parse(args.name)
    try:
        token = args.token_file.read_text().strip()
        bundle = args.ca_bundle.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {e.filename}: {e.strerror}") from e
    chain, key = asyncio.run(certify_once(args.server, identity, bundle_pem=bundle, token=token))
    args.out.mkdir(parents=True, exist_ok=True)
    ca.write_private(args.out / "tls.key", key)
    (args.out / "tls.crt").write_bytes(chain)
    leaf = ca.load_certs(chain)[0]
    print(f"certificate for {identity} valid until "
          f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} written to {args.out}/tls.crt "
          f"(key {args.out}/tls.key)")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    rotation = Rotation(args.dir, leaf_lifetime=args.leaf_lifetime)
    if args.step == "status":
        print(rotation.describe(_now()))
        return 0
    if args.wait:
        ready = rotation.ready_at(rotation.state())
        while ready and _now() < ready:
            print(f"waiting until {ready:%Y-%m-%dT%H:%M:%SZ} for every workload to renew",
                  flush=True)
            time.sleep(min(30.0, max(0.05, (ready - _now()).total_seconds())))
    domain = _trust_domain(IssuerDir(args.dir))
    try:
        if args.step == "add-anchor":
            bundle = rotation.add_anchor(now=_now(), anchor_lifetime=args.anchor_lifetime,
                                         trust_domain=domain)
            print("new anchor added; the bundle now trusts: "
                  + ", ".join(bundle.describe(a) for a in bundle.anchors))
        elif args.step == "reissue-issuer":
            issuer = rotation.reissue_issuer(now=_now(), issuer_lifetime=args.issuer_lifetime,
                                             trust_domain=domain, force=args.force)
            print(f"issuer re-signed by the new anchor, valid until "
                  f"{issuer.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
        else:
            bundle = rotation.remove_anchor(now=_now(), force=args.force)
            print("old anchor removed; the bundle now trusts: "
                  + ", ".join(bundle.describe(a) for a in bundle.anchors))
    except NotYet as e:
        print(f"meshgate: {e}", file=sys.stderr)
        return 3
    print(rotation.describe(_now()))
    return 0

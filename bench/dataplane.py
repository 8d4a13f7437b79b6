"""Benchmark meshgate's proxy pair against nginx direct, stunnel and haproxy pairs.

Everything runs in one go on 127.0.0.1, the way the reference baseline in
shared/reference/perf-baseline was measured (nginx with one worker serving a
2-byte body, stunnel and haproxy pairs with ``nbthread 1``, TLS 1.3 mutual
TLS, ``wrk -t1 --latency``), except that configs go to a temp dir, ports are
picked free at run time, and every proxy uses the same ECDSA P-256 workload
certificates, made with meshgate's own CA code.

Configs (``--configs``): direct, stunnel, haproxy-tcp, haproxy-http,
meshgate-opaque, meshgate-http. Each is run keep-alive at 16 and 64
connections, and with ``Connection: close`` at 16: there req/s is new
connections (TLS handshakes between the proxies) per second; stunnel and
haproxy resume TLS sessions by default, as they did in the reference.

Per run: req/s, p50, p99, p50 added over direct, VmRSS of each proxy after
the run, and CPU microseconds per request of each proxy (utime+stime over the
run). Then meshgate's ratios to the baselines and the targets of the issue.

    .venv/bin/python bench/dataplane.py [--duration 10] [--quick]
        [--configs direct,meshgate-opaque] [--json out.json]

Missing Debian packages (wrk nginx stunnel4 haproxy) are installed with apt-get.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import ca
from mesh.identity.names import Identity

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "cluster.local"
CONFIGS = ("direct", "stunnel", "haproxy-tcp", "haproxy-http", "meshgate-opaque",
           "meshgate-http")
BASELINES = ("stunnel", "haproxy-tcp", "haproxy-http")
MESHGATE = ("meshgate-opaque", "meshgate-http")
PACKAGES = {"wrk": "wrk", "nginx": "nginx", "stunnel4": "stunnel4", "haproxy": "haproxy"}
NOFILE = 65536  # haproxy needs more than 2 x maxconn (8000) descriptors
SERVICE_HOST = "127.0.1.10"
SERVICE_NAME = f"nginx.default.svc.{DOMAIN}"
START_TIMEOUT = 30.0
# Targets: the next step toward at least haproxy per core.
RATIO_TARGETS = (  # meshgate config, baseline, connections, mode, at least this ratio of req/s
    ("meshgate-http", "haproxy-http", 16, "keepalive", 0.8),
    ("meshgate-http", "haproxy-http", 64, "keepalive", 0.8),
    ("meshgate-opaque", "haproxy-tcp", 16, "keepalive", 0.85),
    ("meshgate-opaque", "haproxy-tcp", 64, "keepalive", 0.85),
    ("meshgate-opaque", "haproxy-tcp", 16, "close", 1.0),
)
TARGET_ADDED_P50_MS = {"meshgate-opaque": 0.3, "meshgate-http": 0.45}
TARGET_RSS_KB = 35 * 1024


class BenchError(Exception):
    """A config could not be set up or measured."""


# -- environment --------------------------------------------------------------------------

def ensure_packages(commands: Collection[str] = tuple(PACKAGES)) -> None:
    """Install the Debian packages of `commands` (keys of PACKAGES) that are missing."""
    missing = [PACKAGES[cmd] for cmd in commands if shutil.which(cmd) is None]
    if not missing:
        return
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE for this process and so for every child; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):  # not root: go as high as the hard limit allows
        want = hard if hard != resource.RLIM_INFINITY else want
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- certificates -------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """One workload's certificate files; ``pem`` is chain and key in one file (haproxy)."""

    name: str  # the identity DNS name, the leaf's only DNS SAN
    cert: Path  # leaf + issuer
    key: Path
    pem: Path


@dataclass(frozen=True)
class Certs:
    bundle: Path  # the trust anchors: every proxy's CA file
    server: Workload
    client: Workload


def issue_workload(root: Path, issuer: ca.CertKey, identity: Identity, *,
                   now: dt.datetime) -> Workload:
    """A workload certificate for `identity` (4 hours), in ``root/<namespace>-<name>``."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), identity, now=now,
                        lifetime=dt.timedelta(hours=4))
    d = root / f"{identity.namespace}-{identity.service_account}"
    d.mkdir()
    chain = ca.cert_pem(leaf) + ca.cert_pem(issuer.cert)
    (d / "tls.crt").write_bytes(chain)
    ca.write_private(d / "tls.key", ca.key_pem(key))
    ca.write_private(d / "tls.pem", chain + ca.key_pem(key))
    return Workload(identity.dns_name, d / "tls.crt", d / "tls.key", d / "tls.pem")


def make_certs(root: Path) -> Certs:
    """A trust domain and two workload certificates, as `tests/meshproxy.Trust` makes them;
    ``ca.IssuerDir(root / "trust")`` issues more with `issue_workload`."""
    now = dt.datetime.now(dt.UTC)
    issuers = ca.IssuerDir(root / "trust")
    issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=30),
                 issuer_lifetime=dt.timedelta(days=7), now=now)
    issuer = issuers.load_issuer()
    return Certs(issuers.bundle,
                 issue_workload(root, issuer, Identity("default", "server", DOMAIN), now=now),
                 issue_workload(root, issuer, Identity("default", "client", DOMAIN), now=now))


# -- processes ----------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process the benchmark starts, each in its own process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM the process group, SIGKILL it after 5 s."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers (nginx workers)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def wait_listening(proc: Proc, port: int, host: str = "127.0.0.1",
                   timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} does not listen on {host}:{port} after {timeout:.0f} s:\n"
                     f"{proc.tail()}")


def wait_log(proc: Proc, text: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log.read_text(errors="replace"):
            return
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(0.05)
    raise BenchError(f"{proc.name} printed no {text!r} in {timeout:.0f} s:\n{proc.tail()}")


def rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (every thread), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the systems under test ---------------------------------------------------------------

@dataclass
class Target:
    """What wrk drives for one config, and the proxy processes to measure."""

    config: str
    url: str
    client: Proc | None = None
    server: Proc | None = None
    server_admin: str | None = None  # the server proxy's admin URL (meshgate pairs)

    def procs(self) -> list[Proc]:
        return [p for p in (self.client, self.server) if p is not None]


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 'ok'; }}
    }}
}}
"""


def start_nginx(root: Path, procs: Procs) -> int:
    """nginx with one worker (the reference nginx.conf, in the foreground); its port."""
    base = root / "nginx"
    for d in ("logs", "tmp"):
        (base / d).mkdir(parents=True)
    port = free_port()
    conf = base / "nginx.conf"
    conf.write_text(NGINX_CONF.format(base=base, port=port))
    proc = procs.start("nginx", ["nginx", "-p", str(base), "-e", str(base / "logs/error.log"),
                                 "-c", str(conf)])
    wait_listening(proc, port)
    return port


STUNNEL_COMMON = """\
pid = {base}/{side}.pid
output = {base}/{side}.out
debug = 3
foreground = yes
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""
STUNNEL_CLIENT = """\
[out]
client = yes
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{upstream}
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
cert = {cert}
key = {key}
CAfile = {bundle}
verifyChain = yes
checkHost = {peer}
sni = {peer}
"""
STUNNEL_SERVER = """\
[in]
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{upstream}
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
cert = {cert}
key = {key}
CAfile = {bundle}
verifyChain = yes
requireCert = yes
"""


def start_stunnel(root: Path, procs: Procs, certs: Certs, nginx_port: int) -> Target:
    """The reference stunnel pair (session resumption on, as stunnel defaults)."""
    base = root / "stunnel"
    base.mkdir()
    listen, inbound = free_port(), free_port()
    sides = {
        "server": STUNNEL_SERVER.format(listen=inbound, upstream=nginx_port,
                                        cert=certs.server.cert, key=certs.server.key,
                                        bundle=certs.bundle),
        "client": STUNNEL_CLIENT.format(listen=listen, upstream=inbound,
                                        cert=certs.client.cert, key=certs.client.key,
                                        bundle=certs.bundle, peer=certs.server.name),
    }
    started: dict[str, Proc] = {}
    for side, port in (("server", inbound), ("client", listen)):
        conf = base / f"{side}.conf"
        conf.write_text(STUNNEL_COMMON.format(base=base, side=side) + sides[side])
        started[side] = procs.start(f"stunnel-{side}", ["stunnel4", str(conf)])
        wait_listening(started[side], port)
    return Target("stunnel", f"http://127.0.0.1:{listen}/", started["client"],
                  started["server"])


HAPROXY_COMMON = """\
global
    nbthread 1
    maxconn 8000
    pidfile {base}/{side}.pid
    ssl-default-bind-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
HAPROXY_CLIENT = """\
frontend out
    bind 127.0.0.1:{listen}
    default_backend mesh
backend mesh
    server s1 127.0.0.1:{upstream} ssl crt {pem} ca-file {bundle} verify required \
verifyhost {peer} sni str({peer})
"""
HAPROXY_SERVER = """\
frontend in
    bind 127.0.0.1:{listen} ssl crt {pem} ca-file {bundle} verify required
    default_backend up
backend up
    server n1 127.0.0.1:{upstream}
"""


def start_haproxy(root: Path, procs: Procs, certs: Certs, nginx_port: int,
                  mode: str) -> Target:
    """The reference haproxy pair in ``mode`` tcp or http (connection reuse on)."""
    base = root / f"haproxy-{mode}"
    base.mkdir()
    listen, inbound = free_port(), free_port()
    sides = {
        "server": HAPROXY_SERVER.format(listen=inbound, upstream=nginx_port,
                                        pem=certs.server.pem, bundle=certs.bundle),
        "client": HAPROXY_CLIENT.format(listen=listen, upstream=inbound, pem=certs.client.pem,
                                        bundle=certs.bundle, peer=certs.server.name),
    }
    started: dict[str, Proc] = {}
    for side, port in (("server", inbound), ("client", listen)):
        conf = base / f"{side}.cfg"
        conf.write_text(HAPROXY_COMMON.format(base=base, side=side, mode=mode) + sides[side])
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(conf)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise BenchError(f"haproxy rejects {conf}:\n{check.stdout}{check.stderr}")
        # Not `daemon`: in the foreground the process we started is the one measured.
        started[side] = procs.start(f"haproxy-{mode}-{side}", ["haproxy", "-f", str(conf)])
        wait_listening(started[side], port)
    return Target(f"haproxy-{mode}", f"http://127.0.0.1:{listen}/", started["client"],
                  started["server"])


def start_meshgate(root: Path, procs: Procs, certs: Certs, nginx_port: int, *, opaque: bool,
                   extra: list[str]) -> Target:
    """A meshgate proxy pair: client proxy's service address -> mTLS -> server inbound."""
    config = "meshgate-opaque" if opaque else "meshgate-http"
    base = root / config
    base.mkdir()

    def identity(w: Workload) -> dict[str, str]:
        return {"name": w.name, "trustBundle": str(certs.bundle), "certFile": str(w.cert),
                "keyFile": str(w.key)}

    def listeners() -> dict[str, Any]:
        return {"outbound": {"listen": f"127.0.0.1:{free_port()}"},
                "admin": {"listen": f"127.0.0.1:{free_port()}"}}

    inbound = free_port()
    server_conf = {"identity": identity(certs.server),
                   "inbound": {"listen": f"127.0.0.1:{inbound}", "authorized": ["*"]},
                   **listeners()}
    server_admin = f"http://{server_conf['admin']['listen']}"
    service_port = free_port(SERVICE_HOST)
    discovery = {"services": [{
        "name": SERVICE_NAME, "address": f"{SERVICE_HOST}:{service_port}", "opaque": opaque,
        "endpoints": [{"address": f"127.0.0.1:{inbound}", "targetPort": nginx_port,
                       "identity": certs.server.name}]}]}
    (base / "discovery.yaml").write_text(yaml.safe_dump(discovery))
    client_conf = {"identity": identity(certs.client),
                   "discovery": str(base / "discovery.yaml"),
                   "inbound": {"listen": f"127.0.0.1:{free_port()}", "authorized": ["*"]},
                   **listeners()}
    started: dict[str, Proc] = {}
    for side, conf in (("server", server_conf), ("client", client_conf)):
        path = base / f"{side}.yaml"
        path.write_text(yaml.safe_dump(conf))
        started[side] = procs.start(f"{config}-{side}", [
            sys.executable, "-m", "mesh.cli", "proxy", "run", "--config", str(path), *extra])
        wait_log(started[side], " ready (pid")
    return Target(config, f"http://{SERVICE_HOST}:{service_port}/", started["client"],
                  started["server"], server_admin)


def start_target(config: str, root: Path, procs: Procs, certs: Certs, nginx_port: int,
                 meshgate_args: list[str]) -> Target:
    if config == "direct":
        return Target("direct", f"http://127.0.0.1:{nginx_port}/")
    if config == "stunnel":
        return start_stunnel(root, procs, certs, nginx_port)
    if config.startswith("haproxy-"):
        return start_haproxy(root, procs, certs, nginx_port, config.removeprefix("haproxy-"))
    return start_meshgate(root, procs, certs, nginx_port, opaque=config == "meshgate-opaque",
                          extra=meshgate_args)


def smoke_test(target: Target) -> None:
    """One request through the target, which must answer nginx's 'ok'."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(target.url, timeout=5) as resp:
                body = resp.read()
            if body == b"ok":
                return
            raise BenchError(f"{target.config}: {target.url} answered {body[:100]!r}, not 'ok'")
        except OSError as e:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in target.procs())
                raise BenchError(f"{target.config}: GET {target.url} fails: {e}\n{logs}") from e
            time.sleep(0.2)


# -- wrk ----------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and non-2xx/3xx responses


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise BenchError(f"unreadable wrk latency {text!r}")
    return round(float(m.group(1)) * _UNITS_MS[m.group(2)], 3)


def parse_wrk(out: str) -> WrkResult:
    """The figures of ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    requests = re.search(r"^\s*(\d+) requests in", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and requests and p50 and p99):
        raise BenchError(f"unreadable wrk output:\n{out}")
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        errors += sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    return WrkResult(float(rps.group(1)), int(requests.group(1)), _latency_ms(p50.group(1)),
                     _latency_ms(p99.group(1)), errors)


def run_wrk(procs: Procs, url: str, connections: int, duration: float,
            close: bool, *, script: Path | None = None) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if script is not None:
        argv += ["-s", str(script)]
    proc = procs.start("wrk", [*argv, url])
    try:
        proc.popen.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish within {duration + 30:.0f} s") from e
    finally:
        procs.stop(proc)
    out = proc.log.read_text(errors="replace")
    proc.log.unlink()
    if proc.popen.returncode != 0:
        raise BenchError(f"wrk exited with {proc.popen.returncode}:\n{out}")
    return parse_wrk(out)


# -- measuring ----------------------------------------------------------------------------

@dataclass
class RunResult:
    config: str
    connections: int
    mode: str  # keepalive | close
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    rss_kb: dict[str, int | None] = field(default_factory=dict)
    cpu_us_per_req: dict[str, float | None] = field(default_factory=dict)
    added_p50_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "connections": self.connections, "mode": self.mode,
                "rps": self.rps, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "rss_kb": self.rss_kb, "cpu_us_per_req": self.cpu_us_per_req,
                "added_p50_ms": self.added_p50_ms, "requests": self.requests,
                "errors": self.errors}


def measure(procs: Procs, target: Target, connections: int, duration: float,
            close: bool) -> RunResult:
    sides = {"client": target.client, "server": target.server}
    before = {side: cpu_seconds(p.pid) if p else None for side, p in sides.items()}
    wrk = run_wrk(procs, target.url, connections, duration, close)
    for proc in target.procs():
        if not proc.alive():
            raise BenchError(f"{proc.name} died during the run:\n{proc.tail()}")
    cpu: dict[str, float | None] = {}
    rss: dict[str, int | None] = {}
    for side, p in sides.items():
        start = before[side]
        end = cpu_seconds(p.pid) if p else None
        cpu[side] = (round((end - start) * 1e6 / wrk.requests, 1)
                     if start is not None and end is not None and wrk.requests else None)
        rss[side] = rss_kb(p.pid) if p else None
    return RunResult(target.config, connections, "close" if close else "keepalive", wrk.rps,
                     wrk.p50_ms, wrk.p99_ms, wrk.requests, wrk.errors, rss, cpu)


def bench_config(config: str, root: Path, procs: Procs, certs: Certs, nginx_port: int,
                 args: argparse.Namespace) -> list[RunResult]:
    target = start_target(config, root, procs, certs, nginx_port, args.meshgate_args)
    try:
        smoke_test(target)
        if args.warmup > 0:
            run_wrk(procs, target.url, 16, args.warmup, close=False)
        results = []
        for connections, close in ((16, False), (64, False), (16, True)):
            r = measure(procs, target, connections, args.duration, close)
            print(f"  {r.config:16} c={r.connections:<3} {r.mode:9} {r.rps:10.0f} req/s  "
                  f"p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms"
                  + (f"  ({r.errors} errors)" if r.errors else ""), flush=True)
            results.append(r)
        return results
    finally:
        for p in target.procs():
            procs.stop(p)


# -- reporting ----------------------------------------------------------------------------

def add_direct_deltas(results: list[RunResult]) -> None:
    direct = {(r.connections, r.mode): r for r in results if r.config == "direct"}
    for r in results:
        base = direct.get((r.connections, r.mode))
        if base is not None:
            r.added_p50_ms = round(r.p50_ms - base.p50_ms, 3)


def _fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[RunResult]) -> None:
    header = ("config", "c", "mode", "req/s", "p50 ms", "p99 ms", "+p50 ms",
              "RSS KB cli/srv", "CPU us/req cli/srv", "errors")
    rows = [header]
    for r in results:
        rows.append((r.config, str(r.connections), r.mode, f"{r.rps:.0f}", f"{r.p50_ms:.3f}",
                     f"{r.p99_ms:.3f}", _fmt(r.added_p50_ms, "+.3f"),
                     f"{_fmt(r.rss_kb.get('client'))}/{_fmt(r.rss_kb.get('server'))}",
                     f"{_fmt(r.cpu_us_per_req.get('client'), '.1f')}/"
                     f"{_fmt(r.cpu_us_per_req.get('server'), '.1f')}", str(r.errors)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def print_ratios(results: list[RunResult]) -> None:
    by = {(r.config, r.connections, r.mode): r for r in results}
    lines = []
    for mg in MESHGATE:
        for (config, c, mode), r in by.items():
            if config != mg:
                continue
            for other in BASELINES:
                o = by.get((other, c, mode))
                if o is None or not o.rps:
                    continue
                added = ("" if r.added_p50_ms is None or o.added_p50_ms is None else
                         f", added p50 {r.added_p50_ms:+.3f} vs {o.added_p50_ms:+.3f} ms")
                lines.append(f"  {mg} / {other} c={c} {mode}: req/s x{r.rps / o.rps:.2f}"
                             f"{added}")
    if lines:
        print("\nmeshgate against the baselines:")
        print("\n".join(lines))


@dataclass
class Check:
    what: str
    ok: bool | None  # None: not measured in this run
    detail: str


def targets(results: list[RunResult]) -> list[Check]:
    by = {(r.config, r.connections, r.mode): r for r in results}
    checks: list[Check] = []
    for mg, base, c, mode, ratio in RATIO_TARGETS:
        r, o = by.get((mg, c, mode)), by.get((base, c, mode))
        ok = None if r is None or o is None else r.rps >= ratio * o.rps
        detail = ("not measured" if r is None or o is None
                  else f"{r.rps:.0f} vs {o.rps:.0f} req/s, x{r.rps / o.rps:.2f}")
        checks.append(Check(f"{mg} req/s >= {ratio:g}x {base} pair, c={c} {mode}", ok, detail))
    for mg in MESHGATE:
        r = by.get((mg, 16, "keepalive"))
        added = None if r is None else r.added_p50_ms
        target = TARGET_ADDED_P50_MS[mg]
        checks.append(Check(f"{mg} added p50 <= {target} ms at c=16",
                            None if added is None else added <= target,
                            "not measured" if added is None else f"{added:+.3f} ms"))
        runs = [r for r in results if r.config == mg]
        rss = [v for r in runs for v in r.rss_kb.values() if v is not None]
        checks.append(Check(f"{mg} RSS <= {TARGET_RSS_KB // 1024} MB per proxy",
                            (max(rss) <= TARGET_RSS_KB) if rss else None,
                            f"max {max(rss)} KB" if rss else "not measured"))
    return checks


def print_targets(checks: list[Check]) -> None:
    print("\ntargets:")
    for ch in checks:
        mark = {True: "PASS", False: "FAIL", None: "----"}[ch.ok]
        print(f"  {mark}  {ch.what}: {ch.detail}")


# -- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per wrk run (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="write one JSON object per run to FILE")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unreported c=16 load before each config (0: none)")
    parser.add_argument("--meshgate-args", type=shlex.split, default=[],
                        help="extra `meshgate proxy run` arguments, e.g. '--loop uvloop'")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3.0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        parser.error(f"unknown configs {unknown}; choose from {','.join(CONFIGS)}")
    # direct always runs first: the other configs' added p50 is measured against it
    args.configs = [c for c in CONFIGS if c in configs]
    return args


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_packages()
    nofile = raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="meshgate-dataplane-"))
    procs = Procs(root)
    results: list[RunResult] = []
    failed: list[str] = []
    print(f"dataplane bench: {', '.join(args.configs)}; {args.duration:g} s per run, "
          f"nofile {nofile}, temp dir {root}", flush=True)
    print(f"load average at start: {_loadavg()} (other work on the machine skews req/s)",
          flush=True)
    try:
        with sigterm_as_interrupt():
            certs = make_certs(root)
            nginx_port = start_nginx(root, procs)
            for config in args.configs:
                print(f"{config}:", flush=True)
                try:
                    results += bench_config(config, root, procs, certs, nginx_port, args)
                except BenchError as e:
                    failed.append(config)
                    print(f"  {config} FAILED: {e}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    add_direct_deltas(results)
    print(f"\nload average at end: {_loadavg()}\n")
    print_table(results)
    print_ratios(results)
    print_targets(targets(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

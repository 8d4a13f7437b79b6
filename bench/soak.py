"""Soak meshgate's proxies with new connections and measure the memory they retain.

Two paths on 127.0.0.1, built by bench/dataplane.py and bench/gatewaypath.py:

    pair:     wrk -> client proxy --mTLS--> server proxy -> nginx
    gateway:  wrk -> caller proxy --mTLS--> meshgate gateway --mTLS--> target proxy -> nginx

Modes (``--modes``): opaque-close, opaque-keepalive, http-close, http-keepalive.
The close modes send ``Connection: close``, so every request is a new connection
to the first proxy; in opaque-close that is also a new mTLS connection on every
hop, while the HTTP-aware proxies keep their upstream connections pooled. The
keep-alive modes count requests over wrk's 16 connections, which each wrk run
(below) opens anew and, like every wrk run, closes with requests in flight.
Each (path, mode) gets fresh processes.

Per (path, mode), wrk runs in chunks (``wrk -t1 -c16 -d<chunk>s``) sized from
the measured rate so that each makes about ``--sample-every`` connections
(requests in keep-alive modes), until ``--connections`` have been made or
``--max-seconds`` have passed. wrk's -d counts whole seconds: a mode faster than
``--sample-every`` a second runs 1 s chunks that a wrk script stops after
``--sample-every`` responses. After each chunk: the VmRSS of every meshgate
process and the cumulative count. After the warm-up (the first 10 % of the
count, at least one chunk), the memory each process retains is the least-squares
slope of RSS against the count, in KB per 1,000 connections, and, as a check,
(last - first RSS) / (connections between them) over the same samples. The target is
<= 0.1 KB per connection (100 KB per 1,000). Also reported: how many mTLS
connections the server (target) proxy accepted, from its ``tcp_open_total``.

    .venv/bin/python bench/soak.py [--connections 200000] [--sample-every 10000]
        [--modes opaque-close,http-keepalive] [--paths pair,gateway] [--json out.json]

Exits non-zero if a process died, a mode's wrk runs had more than
``--max-errors`` errors, or a process retained more than the target.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gatewaypath
from dataplane import (
    BenchError,
    Proc,
    Procs,
    ensure_packages,
    make_certs,
    raise_nofile,
    rss_kb,
    run_wrk,
    sigterm_as_interrupt,
    start_meshgate,
    start_nginx,
)

MODES = {"opaque-close": (True, True), "opaque-keepalive": (True, False),
         "http-close": (False, True), "http-keepalive": (False, False)}
"""mode -> (opaque, Connection: close)."""
PATHS = ("pair", "gateway")
TARGET_KB_PER_1K = 100.0
WARMUP_FRACTION = 0.1
MIN_FIT_SAMPLES = 3
CHUNK_S = (1.0, 60.0)
"""Bounds of one wrk run, in seconds."""


@dataclass
class Rig:
    """The running processes of one (path, mode) and the URL wrk drives."""

    url: str
    procs: dict[str, Proc]  # role -> meshgate process
    admin: str  # the admin URL of the proxy in front of nginx


@dataclass
class Sample:
    seconds: float
    count: int  # connections (close modes) or requests (keep-alive modes) made so far
    rss_kb: dict[str, int | None]


@dataclass
class Fit:
    rss_start_kb: int | None
    rss_warm_kb: int | None
    rss_end_kb: int | None
    slope_kb_per_1k: float | None
    slope_se_kb_per_1k: float | None  # the slope's standard error: RSS is noisy
    delta_kb_per_1k: float | None
    ok: bool | None  # None: too few samples to tell


@dataclass
class Soak:
    path: str
    mode: str
    unit: str  # connections | requests
    made: int = 0
    seconds: float = 0.0
    errors: int = 0
    mtls_accepted: int | None = None
    warmup_count: int | None = None
    samples: list[Sample] = field(default_factory=list)
    fits: dict[str, Fit] = field(default_factory=dict)
    failure: str | None = None


# -- setting up ---------------------------------------------------------------------------

def start_rig(path: str, mode: str, root: Path, procs: Procs) -> Rig:
    opaque, _ = MODES[mode]
    if path == "pair":
        certs = make_certs(root)
        target = start_meshgate(root, procs, certs, start_nginx(root, procs), opaque=opaque,
                                extra=[])
        assert target.client is not None and target.server is not None
        assert target.server_admin is not None
        return Rig(target.url, {"client": target.client, "server": target.server},
                   target.server_admin)
    mesh = gatewaypath.start_mesh(root, procs, paths=("gateway",))
    return Rig(mesh.urls[("gateway", "opaque" if opaque else "http")],
               {"caller": mesh.callers["gateway"], "gateway": mesh.gateway,
                "target": mesh.target}, mesh.target_admin)


def mtls_accepted(rig: Rig) -> int | None:
    """Connections the proxy in front of nginx has accepted on its inbound (mTLS) side."""
    try:
        return round(sum(gatewaypath.inbound_by_caller(rig.admin, "tcp_open_total").values()))
    except OSError:
        return None


# -- measuring ----------------------------------------------------------------------------

def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float | None] | None:
    """The slope of ys against xs and its standard error (None under 3 points)."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if n < 3:
        return slope, None
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(residual / (n - 2) / sxx)


def fit(soak: Soak) -> None:
    """The warm-up's end and, per process, the KB retained per 1,000 after it."""
    samples = soak.samples
    if len(samples) < 2:
        return
    warm = next((i for i, s in enumerate(samples)
                 if i >= 1 and s.count >= WARMUP_FRACTION * soak.made), len(samples) - 1)
    soak.warmup_count = samples[warm].count
    after = samples[warm:]
    for role in samples[0].rss_kb:
        points = [(s.count / 1000, v) for s in after if (v := s.rss_kb.get(role)) is not None]
        slope = se = delta = None
        if len(points) >= 2 and (fitted := least_squares(
                [x for x, _ in points], [float(y) for _, y in points])) is not None:
            slope, se = fitted
            (x0, y0), (x1, y1) = points[0], points[-1]
            delta = (y1 - y0) / (x1 - x0) if x1 > x0 else None
        ok = (None if slope is None or len(points) < MIN_FIT_SAMPLES
              or samples[-1].rss_kb.get(role) is None else slope <= TARGET_KB_PER_1K)
        soak.fits[role] = Fit(samples[0].rss_kb.get(role), after[0].rss_kb.get(role),
                              samples[-1].rss_kb.get(role),
                              None if slope is None else round(slope, 2),
                              None if se is None else round(se, 2),
                              None if delta is None else round(delta, 2), ok)


def plan_chunk(rate: float | None, want: int, time_left: float,
               last: bool) -> tuple[float, int | None]:
    """(seconds, cap) of the next wrk run: sized from the rate to make about `want`, or,
    while the rate is unknown or above `want` a second (wrk's -d counts whole seconds),
    1 s stopped by a script after `want` responses. The last run is stopped at `want`
    too, with a quarter more time than the rate needs."""
    lo, hi = CHUNK_S
    if rate is None or rate * lo > want:
        return lo, want
    if last:
        return max(lo, min(hi, time_left, 1.25 * want / rate)), want
    return max(lo, min(hi, time_left, want / rate)), None


def stop_script(root: Path, cap: int) -> Path:
    """A wrk script that stops its (only) thread after `cap` responses."""
    script = root / f"stop-{cap}.lua"
    script.write_text(f"local done = 0\nfunction response()\n  done = done + 1\n"
                      f"  if done >= {cap} then wrk.thread:stop() end\nend\n")
    return script


def run_soak(soak: Soak, rig: Rig, procs: Procs, args: argparse.Namespace) -> None:
    _, close = MODES[soak.mode]
    gatewaypath.smoke_test(rig.url)
    mtls_before = mtls_accepted(rig)
    start = time.monotonic()

    def sample() -> None:
        rss = {role: rss_kb(p.pid) if p.alive() else None for role, p in rig.procs.items()}
        soak.seconds = round(time.monotonic() - start, 1)
        soak.samples.append(Sample(soak.seconds, soak.made, rss))
        dead = [p.name for p in rig.procs.values() if not p.alive()]
        if dead:
            raise BenchError(f"{', '.join(dead)} died after {soak.made:,} {soak.unit}")

    sample()
    rate: float | None = None
    while soak.made < args.connections:
        elapsed = time.monotonic() - start
        if elapsed >= args.max_seconds:
            print(f"    stopped by --max-seconds {args.max_seconds:g} at {soak.made:,} "
                  f"{soak.unit}", flush=True)
            break
        remaining = args.connections - soak.made  # a short tail joins the last chunk
        last = remaining < 1.5 * args.sample_every
        seconds, cap = plan_chunk(rate, remaining if last else args.sample_every,
                                  args.max_seconds - elapsed, last)
        wrk = run_wrk(procs, rig.url, args.wrk_connections, seconds, close,
                      script=None if cap is None else stop_script(procs.logs, cap))
        soak.made += wrk.requests
        soak.errors += wrk.errors
        if cap is None or wrk.requests < cap:  # a capped run's rate is only a lower bound
            rate = wrk.rps
        sample()
        newest = soak.samples[-1]
        print(f"    {soak.made:>9,} {soak.unit}  {newest.seconds:6.0f} s  {wrk.rps:7.0f}/s  "
              "RSS KB " + "  ".join(f"{role} {_fmt(kb)}" for role, kb in newest.rss_kb.items())
              + (f"  ({wrk.errors} errors)" if wrk.errors else ""), flush=True)
        if wrk.requests == 0:
            raise BenchError(f"wrk made no {soak.unit} in {seconds:.0f} s")
        if soak.errors > args.max_errors:
            raise BenchError(f"{soak.errors} wrk errors (more than --max-errors "
                             f"{args.max_errors})")
    after = mtls_accepted(rig)
    if after is not None and mtls_before is not None:
        soak.mtls_accepted = after - mtls_before


def soak_one(path: str, mode: str, root: Path, args: argparse.Namespace) -> Soak:
    """Fresh processes for (path, mode), soaked, stopped; the log tails printed on failure."""
    _, close = MODES[mode]
    soak = Soak(path, mode, "connections" if close else "requests")
    base = root / f"{path}-{mode}"
    base.mkdir()
    procs = Procs(base)
    rig: Rig | None = None
    print(f"{path} {mode}:", flush=True)
    try:
        rig = start_rig(path, mode, base, procs)
        run_soak(soak, rig, procs, args)
    except BenchError as e:
        soak.failure = str(e)
        print(f"  FAILED: {e}", flush=True)
        for p in (rig.procs.values() if rig else procs.running):
            print(f"--- {p.name} ({p.log}), last lines:\n{p.tail(30)}", flush=True)
    finally:
        procs.stop_all()
    fit(soak)
    return soak


# -- reporting ----------------------------------------------------------------------------

def _fmt(value: float | int | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def print_table(soaks: list[Soak]) -> None:
    header = ("path", "mode", "made", "s", "mTLS in", "process", "RSS start KB",
              "after warm-up KB", "end KB", "KB/1k slope", "KB/1k last-first", "verdict")
    rows = [header]
    for s in soaks:
        made = f"{s.made:,} {'conn' if s.unit == 'connections' else 'req'}"
        for role, f in s.fits.items():
            verdict = ("died" if f.rss_end_kb is None
                       else {True: "PASS", False: "FAIL", None: "n/a"}[f.ok])
            rows.append((s.path, s.mode, made, f"{s.seconds:.0f}", _fmt(s.mtls_accepted),
                         role, _fmt(f.rss_start_kb), _fmt(f.rss_warm_kb), _fmt(f.rss_end_kb),
                         _fmt(f.slope_kb_per_1k, "+.1f")
                         + ("" if f.slope_se_kb_per_1k is None
                            else f" ±{f.slope_se_kb_per_1k:.1f}"),
                         _fmt(f.delta_kb_per_1k, "+.1f"),
                         verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def problems(soaks: list[Soak]) -> list[str]:
    out = []
    for s in soaks:
        what = f"{s.path} {s.mode}"
        if s.failure:
            out.append(f"{what}: {s.failure}")
        out += [f"{what}: {role} retains {f.slope_kb_per_1k:+.1f} KB per 1,000 {s.unit} "
                f"(target <= {TARGET_KB_PER_1K:g})"
                for role, f in s.fits.items() if f.ok is False]
        if not s.failure and any(f.ok is None for f in s.fits.values()):
            out.append(f"{what}: fewer than {MIN_FIT_SAMPLES} samples after the warm-up; "
                       "raise --connections or lower --sample-every")
    return out


# -- main ---------------------------------------------------------------------------------

def _choices(parser: argparse.ArgumentParser, text: str, allowed: tuple[str, ...],
             what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown}; choose from {','.join(allowed)}")
    return [c for c in allowed if c in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200_000,
                        help="connections (requests in keep-alive modes) per mode "
                             "(default 200000)")
    parser.add_argument("--sample-every", type=int, default=10_000,
                        help="about this many between RSS samples (default 10000)")
    parser.add_argument("--max-seconds", type=float, default=1800.0,
                        help="bound on each mode's load, in seconds (default 1800)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--wrk-connections", type=int, default=16,
                        help="wrk's concurrent connections (default 16)")
    parser.add_argument("--max-errors", type=int, default=10,
                        help="wrk errors allowed per mode (default 10)")
    parser.add_argument("--json", type=Path, help="write every sample and the summary to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    args.modes = _choices(parser, args.modes, tuple(MODES), "modes")
    args.paths = _choices(parser, args.paths, PATHS, "paths")
    if args.connections < 1 or args.sample_every < 1 or args.max_seconds <= 0:
        parser.error("--connections, --sample-every and --max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_packages(("wrk", "nginx"))
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="meshgate-soak-"))
    soaks: list[Soak] = []
    print(f"soak: {args.connections:,} per mode, a sample every ~{args.sample_every:,}, "
          f"at most {args.max_seconds:g} s per mode; paths {', '.join(args.paths)}; "
          f"modes {', '.join(args.modes)}; temp dir {root}", flush=True)
    try:
        with sigterm_as_interrupt():
            for path in args.paths:
                for mode in args.modes:
                    soaks.append(soak_one(path, mode, root, args))
    except KeyboardInterrupt:
        print("interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nretained memory after the warm-up (target <= {TARGET_KB_PER_1K:g} KB per 1,000 "
          "connections, or requests in keep-alive modes; mTLS in: connections the "
          "server/target proxy accepted)\n")
    print_table(soaks)
    if args.json:
        args.json.write_text(json.dumps({
            "connections": args.connections, "sample_every": args.sample_every,
            "max_seconds": args.max_seconds, "target_kb_per_1k": TARGET_KB_PER_1K,
            "soaks": [asdict(s) for s in soaks]}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if found := problems(soaks):
        print("\n" + "\n".join(found), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

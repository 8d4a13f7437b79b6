"""Experiment: TLS through the event loop's transport (MemoryBIO) against TLS on the
socket itself (a non-blocking `ssl.SSLSocket` driven by add_reader/add_writer).

The proxy terminates and originates TLS with the loop's SSL transports: asyncio's
and uvloop's both run OpenSSL over memory BIOs, copying every record between the
socket's buffer and OpenSSL's. An `SSLSocket` lets OpenSSL read and write the file
descriptor itself. This measures what each costs a server, side by side in one run:
a TLS 1.3 echo server (P-256, as the mesh uses) in a child process per variant, and
one client process keeping ``--connections`` connections busy with round trips of
``--size`` bytes for ``--seconds``, then opening and closing connections (one round
trip each) for as long. The server reports its own CPU time (getrusage), so the
figure is the server's CPU per round trip and per new connection.

Run: `.venv/bin/python bench/tls_io.py [--seconds 5] [--connections 16] [--size 1024]`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import multiprocessing
import resource
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import uvloop

VARIANTS = ("uvloop-transport", "asyncio-transport", "uvloop-sslsocket")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _SocketEcho:
    """An echo connection whose TLS is the socket's own: OpenSSL reads and writes the
    descriptor; the loop only says when it is readable or writable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
        self.loop, self.sock = loop, sock
        self.fd = sock.fileno()
        self.out = b""
        self.handshaken = False
        loop.add_reader(self.fd, self.readable)
        self.readable()

    def readable(self) -> None:
        try:
            if not self.handshaken:
                self.sock.do_handshake()
                self.handshaken = True
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.close()
                    return
                self.send(data)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.fd, self.readable)
        except (OSError, ssl.SSLError):
            self.close()

    def send(self, data: bytes) -> None:
        self.out += data
        try:
            while self.out:
                sent = self.sock.send(self.out)
                self.out = self.out[sent:]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            self.loop.add_writer(self.fd, self.flush)

    def flush(self) -> None:
        self.loop.remove_writer(self.fd)
        self.send(b"")

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()


async def _serve(variant: str, ctx: ssl.SSLContext, ready: multiprocessing.Queue,
                 stop: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    loop = asyncio.get_running_loop()
    if variant.endswith("-transport"):
        server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        listener.setblocking(False)
        port = listener.getsockname()[1]

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        return
                    raise
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _SocketEcho(loop, ctx.wrap_socket(conn, server_side=True,
                                                  do_handshake_on_connect=False))

        loop.add_reader(listener.fileno(), accept)
    ready.put(port)
    while not stop.is_set():
        await asyncio.sleep(0.05)


def _server_main(variant: str, cert: str, key: str, ready: multiprocessing.Queue,
                 marks: multiprocessing.Queue, stop: multiprocessing.Event,
                 mark: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.num_tickets = 1

    async def main() -> None:
        serving = asyncio.ensure_future(_serve(variant, ctx, ready, stop))
        for _ in range(3):  # start, after the round trips, after the new connections
            while not mark.is_set():
                await asyncio.sleep(0.01)
            mark.clear()
            marks.put(_cpu())
        await serving

    if variant.startswith("uvloop"):
        uvloop.run(main())
    else:
        asyncio.run(main())


async def _client(port: int, ctx: ssl.SSLContext, *, connections: int, size: int,
                  seconds: float) -> tuple[int, int]:
    payload = b"x" * size
    deadline = time.monotonic() + seconds
    round_trips = 0

    async def busy() -> None:
        nonlocal round_trips
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        while time.monotonic() < deadline:
            writer.write(payload)
            await reader.readexactly(size)
            round_trips += 1
        writer.close()

    await asyncio.gather(*(busy() for _ in range(connections)))
    return round_trips, 0


async def _new_connections(port: int, ctx: ssl.SSLContext, *, parallel: int,
                           seconds: float) -> int:
    deadline = time.monotonic() + seconds
    opened = 0

    async def churn() -> None:
        nonlocal opened
        while time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(b"x")
            await reader.readexactly(1)
            writer.close()
            await writer.wait_closed()
            opened += 1

    await asyncio.gather(*(churn() for _ in range(parallel)))
    return opened


def run(variant: str, cert: str, key: str, args: argparse.Namespace) -> dict[str, object]:
    mp = multiprocessing.get_context("spawn")
    ready, marks = mp.Queue(), mp.Queue()
    stop, mark = mp.Event(), mp.Event()
    proc = mp.Process(target=_server_main, args=(variant, cert, key, ready, marks, stop, mark))
    proc.start()
    try:
        port = ready.get(timeout=30)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cert)
        mark.set()
        cpu0 = marks.get(timeout=30)
        started = time.monotonic()
        trips, _ = uvloop.run(_client(port, ctx, connections=args.connections,
                                      size=args.size, seconds=args.seconds))
        busy_s = time.monotonic() - started
        mark.set()
        cpu1 = marks.get(timeout=30)
        started = time.monotonic()
        opened = uvloop.run(_new_connections(port, ctx, parallel=4, seconds=args.seconds))
        churn_s = time.monotonic() - started
        mark.set()
        cpu2 = marks.get(timeout=30)
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return {"variant": variant, "round_trips_per_s": round(trips / busy_s),
            "server_cpu_us_per_round_trip": round((cpu1 - cpu0) / trips * 1e6, 2),
            "connections_per_s": round(opened / churn_s),
            "server_cpu_us_per_connection": round((cpu2 - cpu1) / max(opened, 1) * 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshgate-tls-io-") as tmp:
        cert, key = f"{tmp}/tls.crt", f"{tmp}/tls.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        rows = [run(v, cert, key, args) for v in args.variants.split(",")]
    base = rows[0]
    print(f"{'variant':20} {'rt/s':>8} {'cpu µs/rt':>10} {'conn/s':>7} {'cpu µs/conn':>12}")
    for r in rows:
        print(f"{r['variant']:20} {r['round_trips_per_s']:>8} "
              f"{r['server_cpu_us_per_round_trip']:>10} {r['connections_per_s']:>7} "
              f"{r['server_cpu_us_per_connection']:>12}")
    for r in rows[1:]:
        ratio = float(r["server_cpu_us_per_round_trip"]) / float(
            base["server_cpu_us_per_round_trip"])  # type: ignore[arg-type]
        print(f"{r['variant']}: {ratio:.2f}x {base['variant']}'s CPU per round trip")
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One mirror controller per Link, as child processes of one supervisor.

``python -m localcluster.mirrorset --kubeconfig K --state-dir DIR`` watches the
Links of the control namespace and keeps, for each, one child process running
``meshgate mirror run --link NAME`` with a pid file (``DIR/run/mirror-NAME.pid``)
and a log (``DIR/logs/mirror-NAME.log``). A child whose Link is deleted is
stopped once the Link is gone (not while it is being deleted: the controller
removes the Link's mirrors and then its finalizer). A child that exits is
reported in one line naming the Link, its exit status and the last line of its
log, and started again with capped exponential backoff. Every child of a Link
holds the Link's Lease under the same name, so a restarted child resumes at once.

It is the container of meshgate's mirror Deployment (deploy/mirror.yaml), which
`cluster up` installs; children are started under ``setpriv --pdeathsig``
(util-linux) so that they end with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.rootless import meshgate_argv
from mesh.informer import Informer
from mesh.kube import api_client

log = logging.getLogger("mirrorset")

RESTART_MIN = 1.0
RESTART_MAX = 30.0
STOP_TIMEOUT = 5.0
PID_PREFIX = "mirror-"


@dataclass
class _Child:
    link: str
    proc: subprocess.Popen[bytes]
    started: float
    failures: int = 0
    restart_at: float | None = None
    """Set once the child has exited: when to start it again."""
    log_offset: int = field(default=0)


class MirrorSet:
    """Children kept in step with the Links the informer sees."""

    def __init__(self, kubeconfig: Path, state_dir: Path, *, namespace: str = "meshgate"
                 ) -> None:
        from kubernetes import client

        from mirror.link import GROUP, PLURAL, VERSION

        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.namespace = namespace
        self.children: dict[str, _Child] = {}
        self._changed = asyncio.Event()
        custom = client.CustomObjectsApi(api_client(kubeconfig))
        self.links = Informer(functools.partial(
            custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL),
            kind="links", handler=lambda _event, _obj: self._changed.set())

    def pid_file(self, link: str) -> Path:
        return self.state_dir / "run" / f"{PID_PREFIX}{link}.pid"

    def log_file(self, link: str) -> Path:
        return self.state_dir / "logs" / f"{PID_PREFIX}{link}.log"

    def argv(self, link: str) -> list[str]:
        # One name per Link across restarts, as a restarted container keeps its pod's:
        # a child started after its predecessor exited takes the Lease back at once
        # instead of waiting out the Lease of a process that is known to be gone.
        argv = meshgate_argv(("mirror", "run", "--kubeconfig", str(self.kubeconfig),
                              "--link", link, "--namespace", self.namespace,
                              "--metrics-listen", "127.0.0.1:0",
                              "--identity", f"mirrorset-{link}"))
        setpriv = shutil.which("setpriv")
        # The child ends with this process even if it is killed, as a pod's containers do.
        return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv

    async def run(self, stop: asyncio.Event) -> None:
        self.links.start(asyncio.get_running_loop())
        try:
            await self.links.wait_synced()
            print(f"mirrorset: watching Links in namespace {self.namespace} "
                  f"(pid {os.getpid()})", flush=True)
            while not stop.is_set():
                self._changed.clear()
                self.reconcile(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_any(stop), timeout=1.0)
        finally:
            self.links.stop(timeout=1.0)
            for link in list(self.children):
                self._stop(link)

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(
            self._changed.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def reconcile(self, now: float) -> None:
        wanted = {str(obj["metadata"]["name"]) for obj in self.links.objects()}
        for link in sorted(set(self.children) - wanted):
            self._stop(link)
            log.info("mirror stopped link=%s/%s cause=the Link is gone", self.namespace, link)
        for link in sorted(wanted):
            child = self.children.get(link)
            if child is None:
                self._start(link, failures=0)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if child.restart_at is None:
                child.failures += 1
                delay = min(RESTART_MAX, RESTART_MIN * 2 ** (child.failures - 1))
                child.restart_at = now + delay
                self.pid_file(link).unlink(missing_ok=True)
                log.error("mirror exited link=%s/%s status=%s cause=%s restart_in=%.0fs "
                          "log=%s", self.namespace, link, code, self._last_line(child),
                          delay, self.log_file(link))
            elif now >= child.restart_at:
                # A child that ran a good while before failing starts its backoff afresh.
                failures = child.failures if now - child.started < 60 else 0
                self._start(link, failures=failures)

    def _start(self, link: str, *, failures: int) -> None:
        path = self.log_file(link)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(link).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            offset = out.tell()
            proc = subprocess.Popen(self.argv(link), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid_file(link).write_text(f"{proc.pid}\n")
        self.children[link] = _Child(link, proc, time.monotonic(), failures=failures,
                                     log_offset=offset)
        log.info("mirror started link=%s/%s pid=%d log=%s", self.namespace, link, proc.pid,
                 path)

    def _stop(self, link: str) -> None:
        child = self.children.pop(link)
        if child.proc.poll() is None:
            child.proc.terminate()
            try:
                child.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        self.pid_file(link).unlink(missing_ok=True)

    def _last_line(self, child: _Child) -> str:
        try:
            with open(self.log_file(child.link), "rb") as f:
                f.seek(child.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--namespace", default="meshgate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await MirrorSet(args.kubeconfig, args.state_dir, namespace=args.namespace).run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()

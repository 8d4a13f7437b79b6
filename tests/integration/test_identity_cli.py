"""`meshgate identity init|serve|certify|rotate` and `meshgate vm token` as an
operator runs them."""

from __future__ import annotations

import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from mesh.identity import ca
from mesh.identity.names import Identity
from tests.cluster import Cluster


def meshgate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_init_writes_private_keys_and_refuses_overwrite(tmp_path: Path) -> None:
    out = meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                   str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    for name in ("anchor.key", "issuer.key"):
        assert stat.S_IMODE((tmp_path / "t" / name).stat().st_mode) == 0o600
    before = (tmp_path / "t" / "anchor.crt").read_bytes()
    again = meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                     str(tmp_path / "t"))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "t" / "anchor.crt").read_bytes() == before
    forced = meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                      str(tmp_path / "t"), "--force")
    assert forced.returncode == 0 and (tmp_path / "t" / "anchor.crt").read_bytes() != before


@pytest.mark.parametrize(("args", "says"), [
    (["--trust-domain", "Not A Domain"], "trust domain"),
    (["--trust-domain", "cluster.local", "--anchor-lifetime", "soon"], "not a duration"),
])
def test_init_bad_input(tmp_path: Path, args: list[str], says: str) -> None:
    out = meshgate("identity", "init", "--out", str(tmp_path / "t"), *args)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def served(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    trust = tmp_path / "trust"
    assert meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                    str(trust)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "identity", "serve",
                             "--kubeconfig", str(cluster.kubeconfig), "--issuer-dir",
                             str(trust), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or []],
                     daemon=True).start()
    url = ""
    deadline = time.monotonic() + 30
    while not url and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, "identity service exited"
            continue
        if "serving at" in line:
            url = line.split("serving at ")[1].split()[0]
    assert url, "identity service did not start"
    try:
        yield trust, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_certify_end_to_end(cluster: Cluster, served: tuple[Path, str], tmp_path: Path) -> None:
    trust, url = served
    ns = f"c-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api())
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": "web"}})
    token = core.create_namespaced_service_account_token("web", ns, {"spec": {
        "audiences": ["identity.meshgate.io"]}}).status.token
    (tmp_path / "token").write_text(token)
    me = Identity(ns, "web", "cluster.local")
    out = meshgate("identity", "certify", "--server", url, "--ca-bundle",
                   str(trust / "trust-bundle.pem"), "--token-file", str(tmp_path / "token"),
                   "--name", me.dns_name, "--out", str(tmp_path / "web"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "web" / "tls.key").stat().st_mode) == 0o600
    chain = ca.load_certs((tmp_path / "web" / "tls.crt").read_bytes())
    assert Identity.from_certificate(chain[0]) == me

    wrong = meshgate("identity", "certify", "--server", url, "--ca-bundle",
                     str(trust / "trust-bundle.pem"), "--token-file", str(tmp_path / "token"),
                     "--name", Identity(ns, "admin", "cluster.local").dns_name, "--out",
                     str(tmp_path / "admin"))
    assert wrong.returncode == 2 and "identity-mismatch" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    unreachable = meshgate("identity", "certify", "--server", "https://127.0.0.1:1",
                           "--ca-bundle", str(trust / "trust-bundle.pem"), "--token-file",
                           str(tmp_path / "token"), "--name", me.dns_name, "--out",
                           str(tmp_path / "x"))
    assert unreachable.returncode == 2 and "unreachable" in unreachable.stderr


def test_rotate_status_and_refused_early_step(tmp_path: Path) -> None:
    trust = tmp_path / "trust"
    meshgate("identity", "init", "--trust-domain", "cluster.local", "--out", str(trust))
    status = meshgate("identity", "rotate", "status", "--dir", str(trust))
    assert status.returncode == 0 and "next step: add-anchor (now)" in status.stdout
    early = meshgate("identity", "rotate", "reissue-issuer", "--dir", str(trust))
    assert early.returncode == 2 and "phase anchor-added" in early.stderr
    assert meshgate("identity", "rotate", "add-anchor", "--dir", str(trust)).returncode == 0
    too_soon = meshgate("identity", "rotate", "reissue-issuer", "--dir", str(trust))
    assert too_soon.returncode == 3 and "not yet safe" in too_soon.stderr
    status = meshgate("identity", "rotate", "status", "--dir", str(trust))
    assert "next step: reissue-issuer (after" in status.stdout
    assert status.stdout.count("root.cluster.local") >= 2


def test_vm_token_with_a_missing_kubeconfig(cluster: Cluster) -> None:
    missing = meshgate("vm", "token", "--kubeconfig", "/nonexistent/kubeconfig",
                       "--namespace", "default", "--workload", "w", "--service-account", "x",
                       "--control-plane", "https://x:8086")
    assert missing.returncode == 2 and "does not exist" in missing.stderr

"""A cluster without root: `cluster up`, `run-pod` and `down` from a process that
lacks CAP_NET_ADMIN and CAP_SYS_ADMIN run inside a user namespace of its own, and
leave nothing behind.

The process here is uid 0 with no effective capabilities but CAP_SETFCAP (which
mapping uid 0 into a user namespace takes); an ordinary user maps their own uid
the same way. Running as another uid is not possible here: the interpreter lives
under /root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import netns

from localcluster.rootless import privileged

NAME = "mgrootless"
UNPRIVILEGED = ["setpriv", "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,"
                "+no_setuid_fixup_locked", "--inh-caps=-all,+setfcap",
                "--ambient-caps=+setfcap", "--"]


def _meshgate(env: dict[str, str], *args: str, timeout: float = 90
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "mesh.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_cluster_runs_in_a_user_namespace_without_privileges(tmp_path: Path) -> None:
    env = {**os.environ, "MESHGATE_RUN_DIR": str(tmp_path / "run"), "PYTHONUNBUFFERED": "1"}
    probe = subprocess.run([*UNPRIVILEGED, sys.executable, "-c",
                            "from localcluster.rootless import privileged; print(privileged())"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert probe.stdout.strip() == "False", probe.stderr
    assert privileged()  # this test process itself is root
    state = tmp_path / "state"
    web: subprocess.Popen[str] | None = None
    try:
        up = _meshgate(env, "cluster", "up", "--name", NAME, "--state-dir", str(state),
                       "--pod-cidr", "10.226.0.0/16", "--service-cidr", "10.227.0.0/16")
        assert up.returncode == 0, up.stdout + up.stderr
        # The cluster's namespaces exist only inside its own mount namespace.
        assert not [n for n in netns.listnetns() if n.startswith(f"mg-{NAME}-")]
        kubectl = Path(sys.executable).parent / "kubectl"
        made = subprocess.run([str(kubectl), "--kubeconfig", str(state / "kubeconfig"),
                               "create", "service", "clusterip", "web", "--tcp=80:8080"],
                              capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        web = subprocess.Popen([*UNPRIVILEGED, sys.executable, "-m", "mesh.cli", "cluster",
                                "run-pod", "--cluster", NAME, "--name", "web-1", "--label",
                                "app=web", "--port", "8080", "--", sys.executable, "-m",
                                "localcluster.demoapp", "--port", "8080"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 40
        answer = ""
        while time.monotonic() < deadline and "hello from web-1" not in answer:
            assert web.poll() is None, web.stdout.read() if web.stdout else ""
            call = _meshgate(env, "cluster", "run-pod", "--cluster", NAME, "--name", "client",
                             "--", sys.executable, "-c",
                             "import urllib.request; print(urllib.request.urlopen("
                             "'http://web.default.svc.cluster.local/', timeout=5)"
                             ".read().decode())")
            answer = call.stdout
            time.sleep(0.5)
        assert "hello from web-1 in default" in answer
    finally:
        if web is not None:
            web.terminate()
            web.wait(30)
        down = _meshgate(env, "cluster", "down", "--name", NAME)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "run" / "clusters" / f"{NAME}.userns").exists()
    keepers = subprocess.run(["pgrep", "-f", "sleep infinity"], capture_output=True, text=True)
    for pid in keepers.stdout.split():
        assert str(tmp_path) not in Path(f"/proc/{pid}/environ").read_text(errors="replace")

"""`make demo`: three linked clusters in network namespaces, web called by name from a
client pod in east, in east and in west (through west's gateway), the serving pods
and the verified caller identities shown, kubectl usable; VM legacy joining east
with the line `meshgate vm token` printed, called by the client and calling web,
with the identities each side verified and `vm status`; east's web failing over to
west, then central, and back under load with no GET failing; and Ctrl-C running
`vm leave` and removing everything."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyroute2 import netns

from localcluster import vms

CLIENT_ID = "client.default.serviceaccount.identity.meshgate.cluster.local"
VM_ID = "legacy.default.serviceaccount.identity.meshgate.cluster.local"
WEB = "web.default.svc.cluster.local"


def test_demo_shows_linked_clusters_failover_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESHGATE_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "localcluster.demo", "--state-dir",
                             str(tmp_path / "state")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any("Ctrl-C" in s for s in seen):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        text = "".join(seen)
        answers = re.findall(r"^  hello from (web-\d) in default$", text, re.M)
        assert len(answers) == 10, text
        assert ("web-1: client.default.serviceaccount.identity.meshgate.cluster.local"
                in text or "web-2: client.default.serviceaccount.identity.meshgate."
                "cluster.local" in text), text
        # East calls west's web by its mirror's name; west's pod saw east's client.
        assert len(re.findall(r"hello from west-web-1 in default", text)) == 5, text
        assert ("west-web-1 in west: client.default.serviceaccount.identity.meshgate."
                "cluster.local  5" in text), text
        assert "east imports west: gateway 172.30.0.2, gateway alive True" in text, text
        assert "west imports east: gateway 172.30.0.1, gateway alive True" in text, text
        assert "east imports central: gateway 172.30.0.3, gateway alive True" in text, text
        # Both clusters' link reports: gateways from the host, check on each node.
        assert re.search(r"^\s+west\s+True\s", text, re.M), text
        assert re.search(r"^\s+east\s+True\s", text, re.M), text
        assert text.count("every check passed") == 2, text
        kubeconfig = re.search(r"kubectl --kubeconfig (\S+) get", text)
        assert kubeconfig, text
        kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
        assert kubectl
        out = subprocess.run([kubectl, "--kubeconfig", kubeconfig.group(1), "get", "pods"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "web-1" in out.stdout and "client" in out.stdout
        check_vm(text)
        check_failover(text)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        pumping.join(10)
        while not lines.empty():
            seen.append(lines.get())
    text = "".join(seen)
    assert code == 0, text
    # Ctrl-C: the VM left (its agent's changes undone) and was deleted, then the clusters.
    assert f"left: routes, resolver, registration and files of {VM_ID} removed" in text, text
    assert "VM legacy is deleted" in text and "cluster west is down" in text, text
    assert "cluster central is down" in text and "left behind" not in text, text
    assert not [n for n in netns.listnetns()
                if n.startswith(("mg-east-", "mg-west-", "mg-central-"))
                or n in ("mg-wan", vms.netns_name("legacy"))]


def check_vm(text: str) -> None:
    """VM legacy joined east with the printed line; it and east's client called each
    other by name, and each side's proxy verified the other's identity."""
    assert re.search(r"^  meshgate vm token --kubeconfig \S+ --namespace default --workload "
                     r"legacy --service-account legacy --label app=legacy", text, re.M), text
    join = re.search(r"^  (meshgate vm join --token mgjoin\.\S+ .*)$", text, re.M)
    assert join, text
    assert f"meshgate cluster vm exec --name legacy -- {join.group(1)} --foreground" in text
    assert f"joined: {VM_ID} is ready and heartbeating" in text, text
    assert len(re.findall(r"^  hello from legacy in default$", text, re.M)) == 5, text
    # The VM's proxy: the client's calls (and the one that waited for the VM) verified.
    seen = re.search(rf"^  legacy: {re.escape(CLIENT_ID)}  (\d+)$", text, re.M)
    assert seen and int(seen.group(1)) >= 5, text
    # The VM resolves web with glibc (its ClusterIP in east) and calls it with curl.
    assert re.search(rf"^  getent hosts {re.escape(WEB)}: 10\.96\.\d+\.\d+ {re.escape(WEB)}$",
                     text, re.M), text
    assert len(re.findall(r"^  curl: hello from web-\d in default$", text, re.M)) == 5, text
    counted = re.findall(rf"^  web-\d: {re.escape(VM_ID)}  (\d+)$", text, re.M)
    assert sum(int(n) for n in counted) == 5, text
    assert "phase:        joined" in text and "proxy admin:  ready" in text, text


def check_failover(text: str) -> None:
    """Under the client's steady GETs, web moved from east to west (east's pods
    stopped), to central (west's stopped too), back to west and back to east, the
    client's proxy counted each move, and no GET failed."""
    assert re.search(r"^  2 central: 172\.30\.0\.3:4143$", text, re.M), text
    phases = re.findall(r"^failover phase \d/5: [^;]+; (\w+) should answer$.*?"
                        r"^  failed GETs: (\d+)$.*?^  now answering: (\w+) (\d+) \(the last",
                        text, re.M | re.S)
    assert [(p[0], p[2]) for p in phases] == [
        ("east", "east"), ("west", "west"), ("central", "central"), ("west", "west"),
        ("east", "east")], text
    assert all(p[1] == "0" and p[3] == "5" for p in phases), text
    summary = re.search(r"^failover scene: (\d+) GETs, (\d+) failed; answered by cluster: "
                        r"(.*)$\n^  the client proxy's failover events: (.*);", text, re.M)
    assert summary, text
    assert int(summary.group(1)) >= 200 and summary.group(2) == "0", text
    answered = dict(re.findall(r"(\w+) (\d+)", summary.group(3)))
    assert set(answered) == {"east", "west", "central"}, text
    events = summary.group(4)
    for move in ("failover east -> west", "failover west -> central",
                 "failback central -> west", "failback west -> east"):
        assert re.search(rf"{move} [1-9]", events), text

"""Test helpers: run `meshgate cluster serve` as a real process and talk to it
with the official kubernetes client, kubectl, or raw HTTPS."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll until ``predicate`` returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the condition may raise until it holds
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: "
                         f"{last_error!r}")


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Cluster:
    state_dir: Path
    proc: subprocess.Popen[str]
    args: list[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        doc = yaml.safe_load(self.kubeconfig.read_text())
        return str(doc["clusters"][0]["cluster"]["server"])

    @property
    def token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    def api(self, token: str | None = None) -> client.ApiClient:
        """An ApiClient from the kubeconfig, optionally with another bearer token."""
        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        if token is not None:
            api.configuration.refresh_api_key_hook = None
            api.configuration.api_key = {"BearerToken": f"Bearer {token}"}
        return api

    def raw(self, method: str, path: str, body: bytes | None = None, *,
            content_type: str = "application/json", token: str | None = None
            ) -> tuple[int, Any]:
        """One HTTPS request; returns (status, decoded JSON body or text)."""
        ctx = ssl.create_default_context(cafile=str(self.state_dir / "ca.crt"))
        req = urllib.request.Request(self.server + path, data=body, method=method)
        req.add_header("Content-Type", content_type)
        req.add_header("Authorization", f"Bearer {self.token if token is None else token}")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                status, data = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 30,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
        proc = subprocess.run([exe, "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def spawn(args: list[str], ready: Callable[[str], bool], *, what: str,
          timeout: float = 30.0) -> tuple[subprocess.Popen[str], list[str], queue.Queue[str],
                                          str]:
    """Start `args`, its output collected line by line; return once a line satisfies
    `ready`: (process, output so far and to come, queue of lines, the ready line)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if ready(line):
            return proc, output, lines, line
    stop_process(proc)
    raise AssertionError(f"{what} did not start:\n" + "".join(output))


def start_cluster(state_dir: Path, *extra: str, name: str = "test",
                  timeout: float = 30.0) -> Cluster:
    args = [sys.executable, "-m", "mesh.cli", "cluster", "serve", "--name", name,
            "--state-dir", str(state_dir), *extra]
    proc, output, lines, _ = spawn(args, lambda line: line.startswith("kubeconfig:"),
                                   what="cluster", timeout=timeout)
    return Cluster(state_dir, proc, args, lines, output)


def add_meshed_service(api: client.ApiClient, name: str, *, app_port: int, inbound_port: int,
                       labels: dict[str, str], port_name: str | None = None,
                       service_account: str = "web", port: int = 80) -> None:
    """A Service `name` in default selecting one ready Pod at 127.0.0.1, whose app listens
    on `app_port` behind a proxy whose inbound listener is `inbound_port`; the Pod runs
    as `service_account`, the identity its proxy must present. The Service listens on
    `port`."""
    from mesh.discovery.index import INBOUND_PORT_ANNOTATION

    core: Any = client.CoreV1Api(api)
    core.create_namespaced_service("default", {
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": app_port}]}})
    container_port: dict[str, Any] = {"containerPort": app_port}
    if port_name:
        container_port["name"] = port_name
    core.create_namespaced_pod("default", {
        "metadata": {"name": f"{name}-1", "labels": {"app": name},
                     "annotations": {INBOUND_PORT_ANNOTATION: str(inbound_port)}},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "app", "image": "app", "ports": [container_port]}]}})
    core.patch_namespaced_pod_status(f"{name}-1", "default", {"status": {
        "phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}]}},
        _content_type="application/merge-patch+json")

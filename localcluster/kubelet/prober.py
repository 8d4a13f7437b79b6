"""The probes of one running container instance: startup first (the container is
not ``started`` until it succeeds), then liveness (a container failing it is
killed, with ``Unhealthy`` and ``Killing`` Events, and restarted under the Pod's
restartPolicy) and readiness (which sets ``ready``, hence the Pod's Ready
condition and its endpoints), with kube's thresholds, delays and periods."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from localcluster.kubelet import probes
from localcluster.kubelet.containers import Instance
from localcluster.kubelet.status import ContainerView

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from localcluster.kubelet.worker import PodWorker

KINDS = ("startupProbe", "livenessProbe", "readinessProbe")
NAMES = {"startupProbe": "Startup", "livenessProbe": "Liveness", "readinessProbe": "Readiness"}


class Prober:
    def __init__(self, worker: PodWorker, container: Mapping[str, Any], view: ContainerView,
                 inst: Instance) -> None:
        self.worker = worker
        self.container = container
        self.view = view
        self.inst = inst

    def any(self) -> bool:
        return any(k in self.container for k in KINDS)

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:
            log.error("probes stopped pod=%s/%s container=%s cause=%r", self.worker.namespace,
                      self.worker.name, self.container["name"], e)
            raise

    async def _run(self) -> None:
        c = self.container
        if "startupProbe" in c:
            if not await self._until_success("startupProbe"):
                return
            self.view.started = True
            self.worker.container_started(self.view)
        loops = [self._liveness()] if "livenessProbe" in c else []
        if "readinessProbe" in c:
            loops.append(self._readiness())
        await asyncio.gather(*loops)

    async def probe(self, kind: str) -> probes.Result:
        spec = self.container[kind]
        timeout = float(spec.get("timeoutSeconds", 1))
        node = self.worker.node
        pod_ip = self.worker.ip or ""
        try:
            if "httpGet" in spec:
                return await probes.http_get(spec["httpGet"], self.container,
                                             node_netns=node.network.node_netns,
                                             pod_ip=pod_ip, timeout=timeout)
            if "tcpSocket" in spec:
                return await probes.tcp_socket(spec["tcpSocket"], self.container,
                                               node_netns=node.network.node_netns,
                                               pod_ip=pod_ip, timeout=timeout)
            if "exec" in spec:
                found = self.worker.exec_command(self.container["name"],
                                                 spec["exec"].get("command") or [])
                if found is None:
                    return probes.Result(False, "the container is not running")
                argv, env = found
                return await probes.run_exec(argv, env, timeout)
        except ValueError as e:
            return probes.Result(False, str(e))
        return probes.Result(False, "only httpGet, tcpSocket and exec probes are supported")

    async def _failed(self, kind: str, result: probes.Result) -> None:
        await self.worker.node.events.warning(
            self.worker.ref(), "Unhealthy", f"{NAMES[kind]} probe failed: {result.message}")

    def _timing(self, kind: str) -> tuple[float, float, int, int]:
        spec = self.container[kind]
        return (float(spec.get("initialDelaySeconds", 0)), float(spec.get("periodSeconds", 10)),
                int(spec.get("failureThreshold", 3)), int(spec.get("successThreshold", 1)))

    async def _until_success(self, kind: str) -> bool:
        delay, period, failure_threshold, _ = self._timing(kind)
        await asyncio.sleep(delay)
        failures = 0
        while True:
            result = await self.probe(kind)
            if result.ok:
                return True
            failures += 1
            await self._failed(kind, result)
            if failures >= failure_threshold:
                await self._kill(kind)
                return False
            await asyncio.sleep(period)

    async def _liveness(self) -> None:
        delay, period, failure_threshold, _ = self._timing("livenessProbe")
        await asyncio.sleep(delay)
        failures = 0
        while True:
            result = await self.probe("livenessProbe")
            if result.ok:
                failures = 0
            else:
                failures += 1
                await self._failed("livenessProbe", result)
                if failures >= failure_threshold:
                    await self._kill("livenessProbe")
                    return
            await asyncio.sleep(period)

    async def _readiness(self) -> None:
        delay, period, failure_threshold, success_threshold = self._timing("readinessProbe")
        await asyncio.sleep(delay)
        failures = successes = 0
        while True:
            result = await self.probe("readinessProbe")
            if result.ok:
                successes, failures = successes + 1, 0
                if successes >= success_threshold and not self.view.ready:
                    self.worker.set_ready(self.view, True)
            else:
                successes, failures = 0, failures + 1
                await self._failed("readinessProbe", result)
                if failures >= failure_threshold and self.view.ready:
                    self.worker.set_ready(self.view, False)
            await asyncio.sleep(period)

    async def _kill(self, kind: str) -> None:
        name = self.container["name"]
        await self.worker.node.events.normal(
            self.worker.ref(), "Killing",
            f"Container {name} failed {NAMES[kind].lower()} probe, will be restarted")
        spec = self.container[kind]
        grace = spec.get("terminationGracePeriodSeconds")
        if grace is None:
            grace = self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)
        self.inst.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.inst.process.wait()), float(grace))
            return
        self.inst.kill_group()

"""One Pod on the node, from sandbox to removal: its network namespace (with the
Pod's net.* sysctls), its init containers in order (native sidecars started and left
running), each container with its capabilities (localcluster.kubelet.security), its
main containers supervised under the Pod's restartPolicy with kube's back-off, its
status and Events, and its graceful termination."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import namespaces, netns
from localcluster.errors import ApiError
from localcluster.events import EventRecorder
from localcluster.kubelet import containers, garp, images, security
from localcluster.kubelet.backoff import Backoff
from localcluster.kubelet.prober import Prober
from localcluster.kubelet.status import ContainerView, Role, conditions, phase
from localcluster.kubelet.volumes import TokenMinter, VolumeError, Volumes
from localcluster.registry import Registry, WriteOptions
from mesh.errors import MeshError

log = logging.getLogger(__name__)

PODS_KEY = ("", "pods")
MANAGER = WriteOptions(field_manager="kubelet")
_KEY_CHARS = re.compile(r"[^a-z0-9-]+")
VOLUME_RETRY_FIRST = 1.0
VOLUME_RETRY_MAX = 30.0
TOKEN_CHECK_SECONDS = 30.0


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise containers.ConfigError(f"running containers needs `{name}` on PATH")
    return found


@dataclass(frozen=True)
class Node:
    """What every Pod worker shares: the node, its network and where pods keep files."""

    registry: Registry
    name: str
    host_ip: str
    network: netns.ClusterNetwork
    root: Path
    events: EventRecorder
    clock: Callable[[], float]
    mint: TokenMinter
    service_env: Mapping[str, str]
    """KUBERNETES_SERVICE_HOST and _PORT: where containers reach the API server."""


def sandbox_key(namespace: str, name: str, uid: str) -> str:
    """The Pod's name in the cluster network: readable, unique, a DNS label."""
    base = _KEY_CHARS.sub("-", f"{namespace}-{name}".lower()).strip("-")[:40].strip("-")
    return f"{base}-{uid.replace('-', '')[:8]}"


def pod_dir(root: Path, namespace: str, name: str, uid: str) -> Path:
    """As kube's /var/log/pods/<namespace>_<name>_<uid>."""
    return root / f"{namespace}_{name}_{uid}"


class PodWorker:
    def __init__(self, node: Node, pod: Mapping[str, Any]) -> None:
        self.node = node
        self.pod: Mapping[str, Any] = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.key = sandbox_key(self.namespace, self.name, self.uid)
        self.dir = pod_dir(node.root, self.namespace, self.name, self.uid)
        spec = pod["spec"]
        self.restart_policy = str(spec.get("restartPolicy", "Always"))
        self.views: dict[str, ContainerView] = {}
        for c in spec.get("initContainers") or []:
            role = Role.SIDECAR if c.get("restartPolicy") == "Always" else Role.INIT
            self.views[c["name"]] = ContainerView(c["name"], c.get("image", ""), role)
        first = "PodInitializing" if self.views else "ContainerCreating"
        for v in self.views.values():
            v.state = {"waiting": {"reason": "PodInitializing"}}
        for c in spec["containers"]:
            self.views[c["name"]] = ContainerView(c["name"], c.get("image", ""), Role.MAIN,
                                                  state={"waiting": {"reason": first}})
        self._continue_from(pod)
        self.volumes = Volumes(pod, self.dir / "volumes", node.registry.store.get, node.mint,
                               node.host_ip, node.clock)
        self.instances: dict[str, containers.Instance] = {}
        self.exec_env: dict[str, dict[str, str]] = {}
        """Each running container's environment, for the commands exec runs in it."""
        self.backoffs: dict[str, Backoff] = {}
        self.ip: str | None = None
        self._adding: asyncio.Future[netns.Pod] | None = None
        self.start_time = ""
        self.inits_done = not any(v.role is Role.INIT for v in self.views.values())
        self.init_failed = False
        self.terminal = ""
        self.terminating = asyncio.Event()
        self.gone = False
        self._changed = asyncio.Event()
        self._started: dict[str, asyncio.Event] = {n: asyncio.Event() for n in self.views}
        self.task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")
        self._writer = asyncio.create_task(self._write_status())

    def _continue_from(self, pod: Mapping[str, Any]) -> None:
        """A Pod whose containers ran under a kubelet that stopped (the API server was
        restarted): they run again, counted as restarts, the last run's state in
        `lastState` (``Unknown``, 255, if it was still running), as after a node reboot."""
        status = pod.get("status") or {}
        for key in ("initContainerStatuses", "containerStatuses"):
            for cs in status.get(key) or []:
                view = self.views.get(cs.get("name", ""))
                if view is None or not cs.get("containerID"):
                    continue
                view.restart_count = int(cs.get("restartCount", 0)) + 1
                state = cs.get("state") or {}
                if "terminated" in state:
                    view.last_state = {"terminated": state["terminated"]}
                elif "running" in state:
                    view.last_state = {"terminated": {
                        "exitCode": 255, "reason": "Unknown",
                        "startedAt": state["running"].get("startedAt"),
                        "finishedAt": containers.rfc3339(self.node.clock()),
                        "containerID": cs["containerID"]}}
                elif (cs.get("lastState") or {}).get("terminated"):
                    view.last_state = {"terminated": cs["lastState"]["terminated"]}

    # -- from the kubelet ------------------------------------------------------------

    def update(self, pod: Mapping[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.terminating.set()

    def removed(self) -> None:
        """The Pod object is gone (force-deleted): stop everything, write nothing."""
        self.gone = True
        self.terminating.set()

    async def shutdown(self, grace: float) -> None:
        """The kubelet stops: the containers stop within `grace`, the sandbox goes."""
        self.gone = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self._stop_all(grace)
        await self._remove_sandbox()
        self._writer.cancel()

    def log_path(self, container: str, restart: int) -> Path:
        return self.dir / container / f"{restart}.log"

    def exec_command(self, container: str, command: Sequence[str]
                     ) -> tuple[list[str], dict[str, str]] | None:
        """argv and environment that run `command` inside the running `container`: in
        its own network and mount namespaces (so with its volumes and resolv.conf), with
        its environment; None if it is not running."""
        inst = self.instances.get(container)
        env = self.exec_env.get(container)
        if inst is None or env is None:
            return None
        argv = [_tool("nsenter"), f"--target={inst.pid}", "--mount", "--net", "--",
                *command]
        return argv, env

    def running_log(self, container: str) -> Path | None:
        inst = self.instances.get(container)
        return inst.log_path if inst is not None else None

    # -- the life of the Pod -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._live()
        except Exception as e:
            log.error("pod worker failed pod=%s/%s cause=%r", self.namespace, self.name, e)
            raise

    async def _live(self) -> None:
        life = asyncio.create_task(self._lifecycle())
        done = asyncio.create_task(self.terminating.wait())
        try:
            await asyncio.wait({life, done}, return_when=asyncio.FIRST_COMPLETED)
            await self.terminating.wait()  # a finished Pod stays until it is deleted
        finally:
            life.cancel()
            done.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await life
        if not life.cancelled() and life.exception() is not None:
            log.error("pod failed pod=%s/%s cause=%r", self.namespace, self.name,
                      life.exception())
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        await self._stop_all(float(grace))
        await self._remove_sandbox()
        self._changed.set()
        await asyncio.sleep(0)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        if not self.gone:
            await self._write_now()
            try:
                await self.node.registry.delete(
                    self._rt(), self.namespace, self.name,
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}, MANAGER)
            except ApiError as e:
                if e.code not in (404, 409):
                    raise
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _lifecycle(self) -> None:
        spec = self.pod["spec"]
        self.start_time = containers.rfc3339(self.node.clock())
        delay = VOLUME_RETRY_FIRST
        while True:
            # Services are reached through the node's service proxy (a proxy in the
            # pod, if any, makes the service CIDR local itself).
            self._adding = asyncio.ensure_future(asyncio.to_thread(
                netns.add_pod, self.node.network, self.key, services_local=False))
            try:
                sandbox = await asyncio.shield(self._adding)
                break
            except MeshError as e:  # the network is full or not up: say so, try again
                await self.node.events.warning(
                    self._ref(), "FailedCreatePodSandBox",
                    f"Failed to create pod sandbox: {e}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, VOLUME_RETRY_MAX)
        self.ip = str(sandbox.ip)
        await asyncio.to_thread(garp.announce, sandbox.netns, netns.POD_IFNAME, sandbox.ip)
        await self._sysctls(sandbox.netns)
        self._changed.set()
        await self._mount_volumes()
        refresh = asyncio.create_task(self._refresh_tokens())
        try:
            await self._containers(spec)
        finally:
            refresh.cancel()

    async def _sysctls(self, pod_netns: str) -> None:
        """The Pod's net.* sysctls, in its network namespace; one that cannot be set is
        reported (kube refuses such a Pod: SysctlForbidden) and the Pod goes on."""
        sysctls = security.net_sysctls(self.pod)
        if not sysctls:
            return
        try:
            await asyncio.to_thread(namespaces.run_in_namespace, pod_netns,
                                    lambda: security.write_sysctls(sysctls))
        except OSError as e:
            await self.node.events.warning(self._ref(), "SysctlForbidden",
                                           f"cannot set sysctls {sysctls}: {e.strerror or e}")

    async def _mount_volumes(self) -> None:
        """Set the volumes up, retrying (with FailedMount Events) until what they name
        exists, as kube's volume manager does."""
        delay = VOLUME_RETRY_FIRST
        while True:
            try:
                await self.volumes.prepare()
                return
            except (VolumeError, containers.ConfigError) as e:
                await self.node.events.warning(self._ref(), "FailedMount", str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, VOLUME_RETRY_MAX)

    async def _refresh_tokens(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_CHECK_SECONDS)
            try:
                await self.volumes.refresh()
            except ApiError as e:
                log.warning("token not refreshed pod=%s/%s cause=%s", self.namespace,
                            self.name, e)

    async def _containers(self, spec: Mapping[str, Any]) -> None:
        sidecars: list[asyncio.Task[None]] = []
        for c in spec.get("initContainers") or []:
            if c.get("restartPolicy") == "Always":
                sidecars.append(asyncio.create_task(self._supervise(c, "Always")))
                await self._started[c["name"]].wait()
                continue
            if not await self._run_init(c):
                self.init_failed = True
                self.terminal = "Failed"
                self._changed.set()
                await self._stop_all(float(spec.get("terminationGracePeriodSeconds", 30)))
                await self._remove_sandbox()
                return
        self.inits_done = True
        self._changed.set()
        try:
            await asyncio.gather(*(self._supervise(c, self.restart_policy)
                                   for c in spec["containers"]))
        finally:
            for t in sidecars:  # their processes are stopped after the main containers'
                t.cancel()
        mains = [v for v in self.views.values() if v.role is Role.MAIN]
        self.terminal = phase(self.restart_policy, True, False, mains)
        await self._stop_all(float(spec.get("terminationGracePeriodSeconds", 30)))
        await self._remove_sandbox()
        self._changed.set()

    async def _run_init(self, c: Mapping[str, Any]) -> bool:
        """Run one init container to success; False if it failed and may not restart."""
        policy = "Never" if self.restart_policy == "Never" else "OnFailure"
        await self._supervise(c, policy)
        term = self.views[c["name"]].terminated
        return term is not None and term.get("exitCode") == 0

    async def _supervise(self, c: Mapping[str, Any], policy: str) -> None:
        name = c["name"]
        view = self.views[name]
        backoff = self.backoffs.setdefault(name, Backoff())
        while True:
            code = await self._run_once(c, view)
            if code is None:
                return
            if not (policy == "Always" or (policy == "OnFailure" and code != 0)):
                return
            term = view.state["terminated"]
            wait = backoff.after_exit(started=view.started_at_s, finished=self.node.clock())
            view.last_state = {"terminated": term}
            if wait > 0:
                pod = f"{self.name}_{self.namespace}({self.uid})"
                view.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {int(wait)}s restarting failed container={name} pod={pod}")}}
                self._changed.set()
                await self.node.events.warning(
                    self._ref(), "BackOff",
                    f"Back-off restarting failed container {name} in pod {pod}")
                await asyncio.sleep(wait)
            view.restart_count += 1

    async def _run_once(self, c: Mapping[str, Any], view: ContainerView) -> int | None:
        """Start the container and wait for it to exit: its exit code, or None when it
        cannot be started (its status says why)."""
        name = c["name"]
        try:
            env = containers.environment(
                self.pod, c, lookup=self.node.registry.store.get, host_ip=self.node.host_ip,
                service_env=self.node.service_env)
            mounts = self.volumes.mounts(c)
        except (containers.ConfigError, VolumeError) as e:
            return await self._not_started(view, "CreateContainerConfigError", str(e))
        run = images.runnable(c, env)
        if run is None:
            return await self._not_started(view, images.NOT_RUNNABLE_REASON,
                                            f"{images.NOT_RUNNABLE_MESSAGE} (image "
                                            f"{c.get('image', '')!r} has no command)")
        if run.meshgate and "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        cwd = c.get("workingDir") or None
        if cwd is not None and not os.path.isdir(cwd):
            return await self._not_started(view, "CreateContainerError",
                                            f"workingDir {cwd} does not exist on this machine")
        confined = security.confine(c, run.argv, setpriv=_tool("setpriv"))
        argv = netns.pod_command(self.node.network, self.key, Volumes.wrap(
            mounts, confined, sh=_tool("sh"), mount=_tool("mount")))
        now = self.node.clock()
        inst = await containers.start(argv, env=env, cwd=cwd,
                                      log_path=self.log_path(name, view.restart_count),
                                      now=now)
        self.instances[name] = inst
        view.container_id = inst.container_id
        view.started_at_s = now
        view.state = {"running": {"startedAt": containers.rfc3339(now)}}
        view.started = "startupProbe" not in c
        view.ready = view.started and "readinessProbe" not in c
        if view.started:
            self._started[name].set()
        self._changed.set()
        await self.node.events.normal(self._ref(), "Created", f"Created container: {name}")
        await self.node.events.normal(self._ref(), "Started", f"Started container {name}")
        log.info("container started pod=%s/%s container=%s pid=%d restart=%d", self.namespace,
                 self.name, name, inst.pid, view.restart_count)
        self.exec_env[name] = dict(env)
        prober = Prober(self, c, view, inst)
        probing = asyncio.create_task(prober.run()) if prober.any() else None
        try:
            code = await inst.wait()
        finally:
            if probing is not None:
                probing.cancel()
        log.info("container exited pod=%s/%s container=%s code=%d", self.namespace, self.name,
                 name, code)
        self._exited(view, inst, code)
        return code

    def _exited(self, view: ContainerView, inst: containers.Instance, code: int) -> None:
        self.instances.pop(view.name, None)
        view.state = {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": containers.rfc3339(inst.started),
            "finishedAt": containers.rfc3339(self.node.clock()),
            "containerID": inst.container_id}}
        view.ready = view.started = False
        self._changed.set()

    async def _not_started(self, view: ContainerView, reason: str, message: str
                           ) -> int | None:
        """The container stays waiting with `reason`: None, as `_run_once` answers."""
        if view.state.get("waiting", {}).get("reason") != reason:
            view.state = {"waiting": {"reason": reason, "message": message}}
            self._changed.set()
            await self.node.events.warning(self._ref(), "Failed", f"Error: {message}")
        return None

    async def _stop_all(self, grace: float) -> None:
        """Main containers first, then sidecars in reverse order, within `grace`."""
        deadline = self.node.clock() + max(grace, 0.0)
        mains = [n for n, v in self.views.items() if v.role is Role.MAIN]
        sidecars = [n for n, v in reversed(self.views.items()) if v.role is not Role.MAIN]
        for group in (mains, sidecars):
            running = [(n, self.instances[n]) for n in group if n in self.instances]
            for n, inst in running:
                await self.node.events.normal(self._ref(), "Killing", f"Stopping container {n}")
                inst.signal(signal.SIGTERM)

            async def wait_one(n: str, inst: containers.Instance) -> None:
                left = max(deadline - self.node.clock(), 0.0)
                try:
                    await asyncio.wait_for(asyncio.shield(inst.process.wait()), left)
                except TimeoutError:
                    inst.kill_group()
                self._exited(self.views[n], inst, await inst.wait())

            await asyncio.gather(*(wait_one(n, inst) for n, inst in running))

    async def _remove_sandbox(self) -> None:
        if self._adding is None:
            return
        with contextlib.suppress(Exception):
            await self._adding  # a cancelled start may still be creating it
        await asyncio.to_thread(netns.remove_pod, self.node.network, self.key)

    # -- status ----------------------------------------------------------------------

    def _rt(self) -> Any:
        rt = self.node.registry.catalog.lookup("", "v1", "pods")
        assert rt is not None
        return rt

    def container_started(self, view: ContainerView) -> None:
        """Its startup probe succeeded."""
        view.ready = "readinessProbe" not in self._spec_of(view.name)
        self._started[view.name].set()
        self._changed.set()

    def set_ready(self, view: ContainerView, ready: bool) -> None:
        view.ready = ready
        self._changed.set()

    def _spec_of(self, name: str) -> Mapping[str, Any]:
        spec = self.pod["spec"]
        return next(c for c in [*(spec.get("initContainers") or []), *spec["containers"]]
                    if c["name"] == name)

    def ref(self) -> dict[str, Any]:
        return self._ref()

    def _ref(self) -> dict[str, Any]:
        return {"kind": "Pod", "apiVersion": "v1", "metadata": self.pod["metadata"]}

    def status(self, current: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(current.get("status") or {})
        views = list(self.views.values())
        mains = [v for v in views if v.role is Role.MAIN]
        ph = self.terminal or phase(self.restart_policy, self.inits_done, self.init_failed,
                                    mains)
        now = containers.rfc3339(self.node.clock())
        out["phase"] = ph
        out["hostIP"] = self.node.host_ip
        out["hostIPs"] = [{"ip": self.node.host_ip}]
        if self.ip is not None:
            out["podIP"] = self.ip
            out["podIPs"] = [{"ip": self.ip}]
        if self.start_time:
            out["startTime"] = self.start_time
        out["conditions"] = conditions(
            sandbox=self.ip is not None and not self.terminal, inits_done=self.inits_done,
            init_names=[v.name for v in views if v.role is Role.INIT],
            containers=[v for v in views if v.role is not Role.INIT] if not self.terminal
            else [], terminal=ph if self.terminal else "",
            previous=out.get("conditions") or [], now=now)
        if self.terminal:
            for cond in out["conditions"]:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond["status"] = "False"
                    cond["reason"] = "PodCompleted" if ph == "Succeeded" else cond.get(
                        "reason", "PodFailed")
        out["containerStatuses"] = [v.status() for v in mains]
        inits = [v.status() for v in views if v.role is not Role.MAIN]
        if inits:
            out["initContainerStatuses"] = inits
        return out

    async def _write_status(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._write_now()

    async def _write_now(self) -> None:
        store = self.node.registry.store
        current = store.get(PODS_KEY, self.namespace, self.name)
        if current is None or current["metadata"]["uid"] != self.uid:
            return
        status = self.status(current)
        if status == current.get("status"):
            return
        meta = {k: v for k, v in current["metadata"].items() if k != "resourceVersion"}
        body = {**current, "status": status, "metadata": meta}
        try:
            await self.node.registry.update(self._rt(), self.namespace, self.name, body,
                                            MANAGER, subresource="status")
        except ApiError as e:
            if e.code != 404:
                log.warning("pod status not written pod=%s/%s cause=%s", self.namespace,
                            self.name, e)

"""The mirror controller of one Link: it keeps, in the local cluster, a mirror
Service (and its EndpointSlices pointing at the gateway) for every Service of
the linked cluster that the Link selects.

Watch callbacks only put keys on a `WorkQueue`: a `RemoteKey` per remote
Service, and the `Task`s LINK (finalizer, spec, credentials, remote watch),
ORPHANS (mirrors whose remote Service is gone) and STATUS (the Link's status).
Each reconcile reads what is (the informers' caches) and computes what should
be (`mirror.mirrors`), so a restart at any line converges. Mirrors are never
deleted on the strength of a remote cache that is not synced: a remote API
that goes away, or a credential that stops working, freezes the mirrors as
they are and shows in the Link's conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kubernetes import client

from mesh.informer import Informer, Obj
from mesh.workqueue import PermanentError, TemporaryError, WorkQueue
from mirror.addresses import DnsResolver, GatewayAddresses, Resolve
from mirror.credentials import (
    RemoteCredentials,
    credentials_from_secret,
    fingerprint,
    read_secret,
    verify,
)
from mirror.errors import CredentialsError, LinkSpecError, MirrorError, RemoteUnreachable
from mirror.kubeapi import Conflict, LocalApi, NotFound
from mirror.link import CREDENTIALS_SECRET_TYPE, FINALIZER, GROUP, PLURAL, VERSION, LinkSpec
from mirror.link import parse_spec as parse_link_spec
from mirror.metrics import MirrorMetrics
from mirror.mirrors import (
    CLUSTER_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MIRRORED_LABEL,
    SERVICE_NAME_LABEL,
    Placement,
    RemoteKey,
    mirror_service,
    mirror_slices,
    owned,
    placement,
    remote_key,
    service_patch,
    service_up_to_date,
)
from mirror.probe import GatewayProber
from mirror.remote import RemoteCluster
from mirror.status import Condition, ConditionType, latency_summary, link_status, same_status

log = logging.getLogger(__name__)

CHECK_PERIOD = 1.0
"""How often the remote informers' error counts are looked at."""
RETRY_MIN, RETRY_MAX = 0.5, 30.0
RECHECK_MAX = 5.0
"""The longest wait between checks of a remote API that is away."""
LATENCY_REPORT = 10.0
"""How often the probe latency in the Link's status is brought up to date: often
enough for `multicluster gateways`, rarely enough not to write on every probe."""


class Task(Enum):
    LINK = "link"
    ORPHANS = "orphans"
    STATUS = "status"


Key = RemoteKey | Task


@dataclass
class _Gateway:
    config: tuple[Any, ...]
    addresses: GatewayAddresses
    prober: GatewayProber
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class LinkController:
    """Mirrors the Services one Link selects until cancelled (`run`)."""

    def __init__(self, kube: client.ApiClient, *, link: str, namespace: str,
                 metrics: MirrorMetrics, resync: float = 60.0,
                 resolve: Resolve | None = None, workers: int = 4) -> None:
        self.link, self.namespace = link, namespace
        self.metrics = metrics
        self.api = LocalApi(kube)
        self._kube = kube
        self._resync = resync
        self._resolve = resolve
        self._workers = workers
        self._queue: WorkQueue[Key] = WorkQueue(f"mirror-{link}", self._reconcile,
                                                base_delay=0.2, max_delay=RETRY_MAX)
        self._spec: LinkSpec | None = None
        self._spec_error: str | None = None
        self._remote: RemoteCluster | None = None
        self._gateway: _Gateway | None = None
        self._conditions: dict[ConditionType, Condition] = {}
        self._namespaces: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._link_failures = 0
        self._link_retry: asyncio.TimerHandle | None = None
        self._problem = ""
        self._status_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        custom = client.CustomObjectsApi(kube)
        core = client.CoreV1Api(kube)
        self._links = Informer(functools.partial(
            custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
            field_selector=f"metadata.name={link}"), kind="links",
            handler=lambda _e, _o: self._queue.add(Task.LINK))
        self._secrets = Informer(functools.partial(
            core.list_namespaced_secret, namespace,
            field_selector=f"type={CREDENTIALS_SECRET_TYPE}"), kind="secrets",
            handler=self._on_secret)
        self._services = Informer(core.list_service_for_all_namespaces, kind="services",
                                  label_selector=f"{MIRRORED_LABEL}=true",
                                  handler=self._on_local)
        self._slices = Informer(client.DiscoveryV1Api(kube).list_endpoint_slice_for_all_namespaces,
                                kind="endpointslices",
                                label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}",
                                handler=self._on_local)
        self._local = (self._links, self._secrets, self._services, self._slices)

    # -- life cycle ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The local cluster has been read and, if the Link is valid, the remote one."""
        local = all(i.synced for i in self._local)
        return local and (self._spec is None or (self._remote is not None
                                                 and self._remote.synced))

    @property
    def problem(self) -> str:
        """Why the Link is not mirroring, or '' when it is."""
        return self._problem

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        for informer in self._local:
            informer.start(self._loop)
        try:
            for informer in self._local:
                await informer.wait_synced()
            self._queue.add(Task.LINK)
            await asyncio.gather(self._queue.run(self._workers), self._every_resync(),
                                 self._watch_remote(), self._every_latency_report())
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._stop_gateway()
        if self._link_retry is not None:
            self._link_retry.cancel()
        remote, self._remote = self._remote, None
        stopping = [*self._local, *(remote.informers if remote else [])]
        await asyncio.gather(*(asyncio.to_thread(i.stop, 1.0) for i in stopping))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- events (they only enqueue) -------------------------------------------------

    def _on_secret(self, _event: str, obj: Obj) -> None:
        if self._spec is None or obj["metadata"]["name"] == self._spec.cluster_credentials_secret:
            self._queue.add(Task.LINK)

    def _on_local(self, _event: str, obj: Obj) -> None:
        if self._spec is not None and owned(obj, self._spec.target_cluster_name):
            key = remote_key(obj)
            if key is not None:
                self._queue.add(key)
            self._status_soon()

    def _on_remote(self, _event: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        self._queue.add(RemoteKey(str(meta.get("namespace")), str(meta.get("name"))))

    def _status_soon(self) -> None:
        """Write the status shortly: a burst of changes makes one write."""
        if not self._status_pending:
            self._status_pending = True
            self._queue.add_after(Task.STATUS, 0.2)

    def _enqueue_all(self) -> None:
        keys: set[RemoteKey] = set(self._remote.service_keys()) if self._remote else set()
        if self._spec is not None:
            cluster = self._spec.target_cluster_name
            keys |= {k for o in self._services.objects() if owned(o, cluster)
                     if (k := remote_key(o)) is not None}
        for key in sorted(keys):
            self._queue.add(key)
        self._queue.add(Task.ORPHANS)
        self._status_soon()

    async def _every_resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync)
            self._queue.add(Task.LINK)
            self._enqueue_all()

    async def _every_latency_report(self) -> None:
        reported = -1
        while True:
            await asyncio.sleep(LATENCY_REPORT)
            gateway = self._gateway
            if gateway is not None and gateway.prober.probes != reported:
                reported = gateway.prober.probes
                self._status_soon()

    # -- reconciling ------------------------------------------------------------------

    async def _reconcile(self, key: Key) -> None:
        if isinstance(key, RemoteKey):
            await self._reconcile_service(key)
        elif key is Task.LINK:
            await self._reconcile_link()
        elif key is Task.ORPHANS:
            await self._collect_orphans()
        else:
            await self._write_status()

    async def _reconcile_link(self) -> None:
        obj = self._links.cache.get(f"{self.namespace}/{self.link}")
        if obj is None:
            if self._spec is not None:
                log.info("link gone, removing its mirrors link=%s/%s cluster=%s",
                         self.namespace, self.link, self._spec.target_cluster_name)
                await self._remove_mirrors(self._spec.target_cluster_name)
            return
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers:
                await self._unlink(obj)
            return
        if FINALIZER not in finalizers:
            await self._patch_finalizers(obj, [*finalizers, FINALIZER])
        try:
            spec = parse_link_spec(obj)
        except LinkSpecError as e:
            self._spec_error = str(e)
            self._report(str(e), "InvalidSpec")
            self._status_soon()
            return
        self._spec_error = None
        if self._spec is not None and spec.target_cluster_name != self._spec.target_cluster_name:
            await self._remove_mirrors(self._spec.target_cluster_name)
        changed, self._spec = spec != self._spec, spec
        self._ensure_gateway(spec)
        await self._connect(spec)
        if changed:
            self._enqueue_all()
        self._status_soon()

    async def _patch_finalizers(self, obj: Obj, finalizers: list[str]) -> None:
        # The resourceVersion makes it a compare-and-swap: others' finalizers survive.
        try:
            await self.api.patch_link(self.namespace, self.link, {"metadata": {
                "finalizers": finalizers or None,
                "resourceVersion": obj["metadata"]["resourceVersion"]}})
        except (Conflict, NotFound) as e:
            raise TemporaryError(f"Link {self.namespace}/{self.link} changed while its "
                                 "finalizers were written; reading it again") from e

    async def _unlink(self, obj: Obj) -> None:
        spec = self._spec
        with contextlib.suppress(LinkSpecError):
            spec = parse_link_spec(obj)
        if spec is not None:
            await self._remove_mirrors(spec.target_cluster_name)
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        await self._patch_finalizers(obj, finalizers)
        log.info("link deleted, mirrors removed link=%s/%s", self.namespace, self.link)

    async def _remove_mirrors(self, cluster: str) -> None:
        """Every mirror of `cluster` and its slices, read from the API, not the cache."""
        self._disconnect()
        self._stop_gateway()
        self._spec = None
        selector = f"{MIRRORED_LABEL}=true,{CLUSTER_LABEL}={cluster}"
        for svc in await self.api.list_services(selector):
            meta = svc["metadata"]
            if await self.api.delete_service(meta["namespace"], meta["name"]):
                log.info("mirror deleted service=%s/%s cluster=%s cause=link removed",
                         meta["namespace"], meta["name"], cluster)
        slice_selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{CLUSTER_LABEL}={cluster}"
        for s in await self.api.list_slices(slice_selector):
            await self.api.delete_slice(s["metadata"]["namespace"], s["metadata"]["name"])
        left = len(await self.api.list_services(selector))
        if left:
            raise TemporaryError(f"{left} mirrors of cluster {cluster} are still there")

    # -- credentials and the remote watch --------------------------------------------

    async def _connect(self, spec: LinkSpec) -> None:
        """Watch the remote cluster with the Secret's credential, unless already doing so."""
        secret_ref = f"{self.namespace}/{spec.cluster_credentials_secret}"
        selectors = (spec.selector.query(), spec.remote_discovery_selector.query()
                     if spec.remote_discovery_selector is not None else None)
        try:
            secret = await asyncio.to_thread(read_secret, client.CoreV1Api(self._kube),
                                             self.namespace, spec.cluster_credentials_secret)
            current = self._remote
            if (current is not None and current.secret == secret_ref
                    and current.selectors == selectors
                    and current.creds.fingerprint == fingerprint(secret)):
                return
            creds = await asyncio.to_thread(credentials_from_secret, secret)
            await asyncio.to_thread(verify, creds, label_selector=selectors[0],
                                    secret=secret_ref)
        except (CredentialsError, RemoteUnreachable) as e:
            self._connect_failed(e)
            return
        self._connected(creds, secret_ref)
        self._disconnect()
        remote = self._remote = RemoteCluster(creds, secret_ref, selectors,
                                              handler=self._on_remote)
        remote.start(self._loop)
        self._spawn(self._when_synced(remote))
        log.info("watching remote cluster link=%s/%s cluster=%s server=%s selector=%s",
                 self.namespace, self.link, spec.target_cluster_name, creds.server,
                 selectors[0] or "<everything>")

    async def _when_synced(self, remote: RemoteCluster) -> None:
        for informer in remote.informers:
            await informer.wait_synced()
        if remote is self._remote:
            log.info("remote cluster read link=%s/%s services=%d", self.namespace, self.link,
                     len(remote.service_keys()))
            self._enqueue_all()

    def _disconnect(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            self._spawn(asyncio.to_thread(remote.stop))

    def _connected(self, creds: RemoteCredentials, secret: str) -> None:
        self._link_failures = 0
        if self._problem:
            log.info("link connected again link=%s/%s server=%s", self.namespace, self.link,
                     creds.server)
            self._problem = ""
        self._set(ConditionType.CREDENTIALS_VALID, True, "Verified",
                  f"the credential in Secret {secret} may list Services at {creds.server}")
        self._set(ConditionType.REMOTE_REACHABLE, True, "Reachable",
                  f"the remote API at {creds.server} answers")

    def _connect_failed(self, e: MirrorError) -> None:
        if isinstance(e, CredentialsError):
            # The mirrors stay as they are; without a credential there is nothing to compare.
            self._disconnect()
            self._set(ConditionType.CREDENTIALS_VALID, False, e.reason, str(e))
            self._set(ConditionType.REMOTE_REACHABLE, None, "NotChecked",
                      "the remote API is not asked without a valid credential")
        else:
            self._set(ConditionType.REMOTE_REACHABLE, False, e.reason, str(e))
        if str(e) != self._problem:
            self._link_failures = 0  # a new problem: retry soon, then back off again
        self._report(str(e), e.reason)
        self._link_failures += 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** (self._link_failures - 1))
        if self._link_retry is not None:
            self._link_retry.cancel()
        assert self._loop is not None
        self._link_retry = self._loop.call_later(delay, self._queue.add, Task.LINK)
        self._status_soon()

    def _report(self, problem: str, reason: str) -> None:
        """One log line per problem, not one per retry."""
        if problem != self._problem:
            self._problem = problem
            log.warning("link not mirroring link=%s/%s reason=%s cause=%s; mirrors are kept",
                        self.namespace, self.link, reason, problem)

    def _set(self, kind: ConditionType, status: bool | None, reason: str, message: str) -> None:
        new = Condition(kind, status, reason, message)
        if self._conditions.get(kind) != new:
            self._conditions[kind] = new
            self._status_soon()

    async def _watch_remote(self) -> None:
        """Tell the remote API going away (or refusing the credential) from the
        informers' errors, confirm with one call, and say when it is back."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(CHECK_PERIOD)
            remote = self._remote
            if remote is None:
                continue
            errors = remote.errors
            now = self._loop.time()
            if errors == remote.errors_seen and not (remote.failures and now >= remote.next_check):
                continue
            remote.errors_seen = errors
            try:
                await asyncio.to_thread(verify, remote.creds, label_selector=remote.selectors[0],
                                        secret=remote.secret)
            except (CredentialsError, RemoteUnreachable) as e:
                if remote is not self._remote:
                    continue
                kind = (ConditionType.CREDENTIALS_VALID if isinstance(e, CredentialsError)
                        else ConditionType.REMOTE_REACHABLE)
                self._set(kind, False, e.reason, str(e))
                self._report(str(e), e.reason)
                remote.failures += 1
                # Capped low: once the API is back the informers stop failing, so
                # only this check can tell, and it is one cheap call.
                remote.next_check = now + min(RECHECK_MAX, RETRY_MIN * 2 ** remote.failures)
                continue
            if remote is self._remote:
                remote.failures = 0
                self._connected(remote.creds, remote.secret)

    # -- the gateway ----------------------------------------------------------------

    def _ensure_gateway(self, spec: LinkSpec) -> None:
        config = (spec.target_cluster_name, spec.gateway_addresses, spec.probe_spec)
        if self._gateway is not None and self._gateway.config == config:
            return
        self._stop_gateway()
        addresses = GatewayAddresses(spec.gateway_addresses,
                                     resolve=self._resolve or DnsResolver())
        prober = GatewayProber(spec.target_cluster_name, spec.probe_spec, addresses.addresses,
                               metrics=self.metrics, on_change=self._gateway_changed)
        gateway = self._gateway = _Gateway(config, addresses, prober)
        gateway.tasks = [self._spawn(addresses.run(self._gateway_changed)),
                         self._spawn(prober.run())]

    def _stop_gateway(self) -> None:
        gateway, self._gateway = self._gateway, None
        for task in gateway.tasks if gateway else []:
            task.cancel()

    def _gateway_changed(self) -> None:
        self._enqueue_all()

    def _gateway_condition(self) -> Condition | None:
        if self._gateway is None:
            return None
        status, reason, message = self._gateway.prober.summary()
        return Condition(ConditionType.GATEWAY_ALIVE, status, reason, message)

    # -- one remote Service -----------------------------------------------------------

    async def _reconcile_service(self, key: RemoteKey) -> None:
        spec, remote = self._spec, self._remote
        if spec is None or remote is None or not remote.synced:
            return  # never judge a mirror against a remote that has not been read
        where = placement(key, spec)
        current = self._services.cache.get(str(where))
        source = remote.get(key)
        if source is None:
            await self._delete_mirror(where, current, spec, cause="remote service gone or no "
                                      "longer selected")
            return
        if current is not None:
            self._check_ours(current, where, key, spec=spec)
        desired = mirror_service(source, spec)
        if not desired["spec"]["ports"]:
            raise PermanentError(f"remote Service {key} of cluster {spec.target_cluster_name} "
                                 "has no ports; it is not mirrored")
        if where.namespace not in self._namespaces:
            await self.api.ensure_namespace(where.namespace, {
                MIRRORED_LABEL: "true", CLUSTER_LABEL: spec.target_cluster_name})
            self._namespaces.add(where.namespace)
        endpoints = self._gateway.prober.endpoints() if self._gateway else []
        try:
            service = await self._apply_service(desired, current, where=where, key=key,
                                                spec=spec)
            slices = mirror_slices(service, spec, endpoints,
                                   owner_uid=service["metadata"].get("uid"))
            await self.api.apply_slices(where.namespace, slices, self._slices_of(where),
                                        cluster=spec.target_cluster_name)
        except NotFound as e:  # deleted underneath us: the next pass creates it again
            self._namespaces.discard(where.namespace)
            raise TemporaryError(f"{e} failed: it, or its namespace, is gone") from e

    def _check_ours(self, current: Obj, where: Placement, key: RemoteKey, *, spec: LinkSpec
                    ) -> None:
        if owned(current, spec.target_cluster_name) and remote_key(current) == key:
            return
        other = remote_key(current) if owned(current, spec.target_cluster_name) else None
        what = (f"the mirror of {other}" if other else "a Service that is not a mirror of "
                f"cluster {spec.target_cluster_name}")
        raise PermanentError(f"Service {where} is already {what}; remote Service {key} is not "
                             "mirrored (change the Link's namespaceMapping or rename one)")

    async def _apply_service(self, desired: Obj, current: Obj | None, *, where: Placement,
                             key: RemoteKey, spec: LinkSpec) -> Obj:
        if current is None:
            try:
                created = await self.api.create_service(desired)
                log.info("mirror created service=%s remote=%s cluster=%s", where, key,
                         spec.target_cluster_name)
                return created
            except Conflict:
                current = await self.api.read_service(where.namespace, where.name)
                self._check_ours(current, where, key, spec=spec)
        if service_up_to_date(current, desired):
            return current
        patched = await self.api.patch_service(where.namespace, where.name,
                                               service_patch(current, desired))
        log.info("mirror updated service=%s remote=%s cluster=%s", where, key,
                 spec.target_cluster_name)
        return patched

    def _slices_of(self, where: Placement) -> dict[str, Obj]:
        cluster = self._spec.target_cluster_name if self._spec else ""
        return {o["metadata"]["name"]: o for o in self._slices.objects()
                if o["metadata"].get("namespace") == where.namespace and owned(o, cluster)
                and (o["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == where.name}

    async def _delete_mirror(self, where: Placement, current: Obj | None, spec: LinkSpec, *,
                             cause: str) -> None:
        cluster = spec.target_cluster_name
        if (current is not None and owned(current, cluster)
                and await self.api.delete_service(where.namespace, where.name)):
            log.info("mirror deleted service=%s cluster=%s cause=%s", where, cluster, cause)
        for name in self._slices_of(where):
            await self.api.delete_slice(where.namespace, name)

    # -- orphans ------------------------------------------------------------------------

    async def _collect_orphans(self) -> None:
        """Delete mirrors of this cluster that no selected remote Service places
        where they are (the remote is gone, unselected, or mapped elsewhere now)."""
        spec, remote = self._spec, self._remote
        if spec is None or remote is None or not remote.synced:
            return
        cluster = spec.target_cluster_name
        wanted = {str(placement(k, spec)) for k in remote.service_keys()}
        for svc in self._services.objects():
            if not owned(svc, cluster):
                continue
            meta = svc["metadata"]
            here = f"{meta['namespace']}/{meta['name']}"
            key = remote_key(svc)
            if key is not None and str(placement(key, spec)) == here and here in wanted:
                continue
            where = Placement(meta["namespace"], meta["name"], meta["name"])
            await self._delete_mirror(where, svc, spec, cause="orphaned: its remote service "
                                      "is gone, unselected or mirrored elsewhere")
        services = {f"{o['metadata']['namespace']}/{o['metadata']['name']}"
                    for o in self._services.objects() if owned(o, cluster)}
        for s in self._slices.objects():
            meta = s["metadata"]
            owner = f"{meta['namespace']}/{(meta.get('labels') or {}).get(SERVICE_NAME_LABEL)}"
            if owned(s, cluster) and owner not in services and owner not in wanted:
                await self.api.delete_slice(meta["namespace"], meta["name"])

    # -- status ---------------------------------------------------------------------------

    async def _write_status(self) -> None:
        self._status_pending = False
        obj = self._links.cache.get(f"{self.namespace}/{self.link}")
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        conditions = dict(self._conditions)
        gateway = self._gateway_condition()
        if gateway is not None:
            conditions[ConditionType.GATEWAY_ALIVE] = gateway
        cluster = self._spec.target_cluster_name if self._spec else None
        mirrors = [o for o in self._services.objects() if cluster and owned(o, cluster)]
        previous = obj.get("status") or {}
        # A new prober has no samples yet: the last figures stand until it has.
        latency = (latency_summary(self._gateway.prober.latencies) if self._gateway else None
                   ) or previous.get("gatewayLatency")
        status = link_status(conditions, mirrors, previous=previous,
                             generation=obj["metadata"].get("generation"),
                             spec_error=self._spec_error, latency=latency)
        if cluster:
            self.metrics.mirrored_services.labels(cluster).set(len(mirrors))
        if same_status(status, obj.get("status")):
            return
        try:
            await self.api.patch_link_status(self.namespace, self.link, status)
        except NotFound:
            return


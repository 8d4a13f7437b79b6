"""One active mirror controller per Link: leader election over a
``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

The holder renews the Lease every `renew_period`; a standby polls it as often
and takes it over once it has seen no renewal for the Lease's duration,
measured on its own clock (clocks of different machines are never compared).
Every write carries the resourceVersion it read, so of two standbys racing
for an expired Lease exactly one wins. A holder that cannot renew for
`renew_deadline` steps down before anyone else may take over; one that stops
cleanly releases the Lease so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)


def default_identity() -> str:
    return f"{socket.gethostname()}_{os.getpid()}"


def lease_name(link: str) -> str:
    return f"mirror-{link}"


def _micro_time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    duration: float = 15.0
    renew_period: float = 5.0

    @property
    def renew_deadline(self) -> float:
        """How long a holder keeps acting without a successful renewal."""
        return self.duration * 2 / 3


class LeaseLock:
    """`acquire()` returns once this process holds the Lease; `hold()` keeps it
    renewed and returns when it is lost. The sync methods block: they are run
    in threads."""

    def __init__(self, api: client.ApiClient, settings: LeaseSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.holder = ""
        """The holder last seen."""
        self._api: Any = client.CoordinationV1Api(api)
        self._clock = clock
        self._observed: str | None = None
        self._observed_at = 0.0

    # -- one attempt --------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Whether this process holds the Lease after one read and at most one write."""
        s = self.settings
        try:
            resp = self._api.read_namespaced_lease(s.name, s.namespace, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise
            return self._create()
        lease: dict[str, Any] = json.loads(resp.data)
        spec = lease.get("spec") or {}
        version = str(lease["metadata"].get("resourceVersion"))
        self.holder = str(spec.get("holderIdentity") or "")
        if version != self._observed:
            self._observed, self._observed_at = version, self._clock()
        if self.holder == s.identity:
            return self._write(lease, transitions=int(spec.get("leaseTransitions") or 0),
                               acquired=spec.get("acquireTime") or _micro_time())
        duration = float(spec.get("leaseDurationSeconds") or s.duration)
        if self.holder and self._clock() - self._observed_at < duration:
            return False
        return self._write(lease, transitions=int(spec.get("leaseTransitions") or 0) + 1,
                           acquired=_micro_time())

    def release(self) -> None:
        """Give the Lease up if this process holds it, so a standby need not wait."""
        s = self.settings
        try:
            resp = self._api.read_namespaced_lease(s.name, s.namespace, _preload_content=False)
            lease = json.loads(resp.data)
            if (lease.get("spec") or {}).get("holderIdentity") != s.identity:
                return
            lease["spec"].update({"holderIdentity": "", "leaseDurationSeconds": 1,
                                  "renewTime": _micro_time()})
            self._api.replace_namespaced_lease(s.name, s.namespace, lease)
            log.info("lease released lease=%s/%s holder=%s", s.namespace, s.name, s.identity)
        except ApiException as e:
            log.warning("lease not released lease=%s/%s cause=%s %s; a standby takes over "
                        "when it expires", s.namespace, s.name, e.status, e.reason)

    def _spec(self, *, transitions: int, acquired: str) -> dict[str, Any]:
        now = _micro_time()
        return {"holderIdentity": self.settings.identity,
                "leaseDurationSeconds": max(1, math.ceil(self.settings.duration)),
                "acquireTime": acquired, "renewTime": now, "leaseTransitions": transitions}

    def _create(self) -> bool:
        s = self.settings
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": s.name, "namespace": s.namespace,
                             "labels": {"app.kubernetes.io/part-of": "meshgate"}},
                "spec": self._spec(transitions=0, acquired=_micro_time())}
        try:
            self._api.create_namespaced_lease(s.namespace, body)
        except ApiException as e:
            if e.status == 409:
                return False  # another instance created it first
            raise
        self.holder = s.identity
        return True

    def _write(self, lease: dict[str, Any], *, transitions: int, acquired: str) -> bool:
        s = self.settings
        lease["spec"] = self._spec(transitions=transitions, acquired=acquired)
        try:
            self._api.replace_namespaced_lease(s.name, s.namespace, lease)
        except ApiException as e:
            if e.status in (404, 409):
                return False  # changed or gone since we read it: look again next round
            raise
        self.holder = s.identity
        return True

    # -- the loops ----------------------------------------------------------------

    async def acquire(self) -> None:
        """Return once this process holds the Lease."""
        s = self.settings
        standby_logged = ""
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    log.info("lease acquired lease=%s/%s holder=%s", s.namespace, s.name,
                             s.identity)
                    return
                if self.holder != standby_logged:
                    standby_logged = self.holder
                    log.info("standing by lease=%s/%s holder=%s self=%s", s.namespace,
                             s.name, self.holder, s.identity)
            except Exception as e:  # the API being away is waited out
                log.warning("lease not read lease=%s/%s cause=%s", s.namespace, s.name,
                            _describe(e))
            await asyncio.sleep(s.renew_period)

    async def hold(self) -> None:
        """Renew the Lease until it is lost, then return."""
        s = self.settings
        renewed = self._clock()
        while True:
            await asyncio.sleep(s.renew_period)
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    renewed = self._clock()
                    continue
                if self.holder and self.holder != s.identity:
                    log.warning("lease lost lease=%s/%s holder=%s self=%s", s.namespace,
                                s.name, self.holder, s.identity)
                    return
            except Exception as e:
                log.warning("lease not renewed lease=%s/%s cause=%s", s.namespace, s.name,
                            _describe(e))
            if self._clock() - renewed > s.renew_deadline:
                log.warning("lease lost lease=%s/%s self=%s cause=not renewed for %.1fs",
                            s.namespace, s.name, s.identity, self._clock() - renewed)
                return


def _describe(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

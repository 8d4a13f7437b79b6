"""The inbound proxy's authorization rules, kept current by the control plane.

`PolicyWatch` follows ``/v1/policy`` for this proxy's pod, or ExternalWorkload
when the proxy is a VM's (`mesh.control.policy_api`), and answers, for each
port, the `PortPolicy` to apply: the one a Server selects, or the cluster
default. Until the first message arrives, and while the control
plane is away, it answers from what it last knew (at first: the default,
all-authenticated).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from mesh.authz import AccessPolicy, PortPolicy
from mesh.discovery.stream import ControlStream
from mesh.errors import ProtocolError

log = logging.getLogger(__name__)

PATH = "/v1/policy"


class PolicyWatch(ControlStream):
    """The port policies of one pod (or ExternalWorkload), from the control plane at
    ``url``."""

    what = "policy stream"

    def __init__(self, url: str, *, namespace: str, pod: str | None = None,
                 external_workload: str | None = None, **options: Any) -> None:
        if (pod is None) == (external_workload is None):
            raise ValueError("give exactly one of pod and external_workload")
        query = ({"namespace": namespace, "pod": pod} if pod is not None else
                 {"namespace": namespace, "externalworkload": external_workload})
        super().__init__(url, f"{PATH}?{urlencode(query)}", **options)
        self.default = AccessPolicy.ALL_AUTHENTICATED
        self.ports: dict[int, PortPolicy] = {}
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each policy the control plane sends is applied."""
        self._listeners.append(listener)

    def for_port(self, port: int) -> PortPolicy:
        found = self.ports.get(port)
        return found if found is not None else PortPolicy(port=port, access=self.default)

    def receive_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as e:
            log.warning("policy message skipped server=%s cause=not JSON: %s", self.url, e)
            return
        if not isinstance(msg, dict) or msg.get("type") != "policy":
            return  # heartbeats, and kinds a newer control plane may add
        self.set_heartbeat(msg.get("heartbeatSeconds"))
        try:
            default = AccessPolicy(str(msg.get("default")))
            items = msg.get("ports")
            if not isinstance(items, list):
                raise ProtocolError("ports is not a list")
            ports = {p.port: p for p in (PortPolicy.from_json(json.dumps(item))
                                         for item in items)}
        except (ValueError, ProtocolError) as e:
            log.warning("policy message skipped server=%s cause=%s (keeping the last known "
                        "policy)", self.url, e)
            return
        self.default, self.ports = default, ports
        if not self.connected:  # a stream's first message; the later ones are updates
            self.snapshot_applied()
        for listener in self._listeners:
            listener()
        log.info("policy applied server=%s default=%s ports=%s", self.url, default,
                 ",".join(str(p) for p in sorted(ports)) or "-")

"""The VM's ExternalWorkload: its address on join, its Ready heartbeat while the
agent runs, and its withdrawal on leave.

The agent reaches the API server with the credential its join token brought
(`AgentAccess`): a ServiceAccount token whose Role allows get, update and patch
of this one ExternalWorkload and its status, nothing else. The operator created
the object (`meshgate vm token`); the VM fills in where it is and that it is
alive. The control plane counts it ready while the heartbeat keeps changing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from mesh.control.externalworkloads import GROUP, LEFT_REASON, PLURAL, READY, VERSION
from vm_agent.state import AgentError, now_text

log = logging.getLogger(__name__)

class RegistrationUnreachable(AgentError):
    """The API server did not answer; worth retrying."""


class Registration:
    """One ExternalWorkload, through the agent's limited credential."""

    def __init__(self, *, server: str, token_file: Path, ca_file: Path | None,
                 namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.server = server
        cfg = client.Configuration()
        cfg.host = server
        cfg.api_key = {"authorization": token_file.read_text().strip()}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        if ca_file is not None and ca_file.exists() and ca_file.stat().st_size:
            cfg.ssl_ca_cert = str(ca_file)
        cfg.retries = 0
        self.api = client.CustomObjectsApi(client.ApiClient(cfg))
        self._written: tuple[str, str] | None = None
        """(status, lastTransitionTime) of the Ready condition this agent last wrote."""

    @property
    def what(self) -> str:
        return f"ExternalWorkload {self.namespace}/{self.name}"

    def get(self) -> dict[str, Any]:
        return self._call("read", self.api.get_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURAL, self.name)

    def register(self, address: str) -> None:
        """Set the workload's address (its only workloadIP)."""
        self._call("update", self.api.patch_namespaced_custom_object, GROUP, VERSION,
                   self.namespace, PLURAL, self.name,
                   {"spec": {"workloadIPs": [{"ip": address}]}})

    def heartbeat(self, *, ready: bool, reason: str, message: str) -> None:
        """Write the Ready condition with a fresh lastProbeTime."""
        now = now_text()
        status = "True" if ready else "False"
        if self._written is None:  # read once; later beats know what they wrote
            current = self._condition() or {}
            self._written = (str(current.get("status")),
                             str(current.get("lastTransitionTime") or now))
        since = self._written[1] if self._written[0] == status else now
        self._call("update the status of", self.api.patch_namespaced_custom_object_status,
                   GROUP, VERSION, self.namespace, PLURAL, self.name,
                   {"status": {"conditions": [{
                       "type": READY, "status": status, "lastProbeTime": now,
                       "lastTransitionTime": since, "reason": reason,
                       "message": message}]}})
        self._written = (status, since)

    def withdraw(self) -> None:
        """No address and not ready: the workload leaves every Service's endpoints."""
        self.heartbeat(ready=False, reason=LEFT_REASON, message="the VM left the mesh "
                       "(`meshgate vm leave`)")
        self._call("update", self.api.patch_namespaced_custom_object, GROUP, VERSION,
                   self.namespace, PLURAL, self.name, {"spec": {"workloadIPs": []}})

    def _condition(self) -> dict[str, Any] | None:
        obj = self.get()
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if isinstance(cond, dict) and cond.get("type") == READY:
                return cond
        return None

    def _call(self, verb: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ApiException as e:
            if e.status == 404:
                raise AgentError(f"{self.what} does not exist at {self.server}; the "
                                 "operator's `meshgate vm token` creates it") from e
            if e.status in (401, 403):
                raise AgentError(f"the API server refused to {verb} {self.what} with the "
                                 f"agent's credential ({e.status} {e.reason}); mint a new "
                                 "token with `meshgate vm token` and join again") from e
            if e.status >= 500 or e.status == 0:
                raise RegistrationUnreachable(f"the API server at {self.server} failed to "
                                              f"{verb} {self.what}: {e.status} "
                                              f"{e.reason}") from e
            raise AgentError(f"the API server refused to {verb} {self.what}: {e.status} "
                             f"{e.reason}: {(e.body or '')[:200]}") from e
        except (HTTPError, OSError) as e:
            raise RegistrationUnreachable(f"API server {self.server} unreachable: "
                                          f"{type(e).__name__}: {e}") from e

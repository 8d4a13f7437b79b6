"""Posting an AdmissionReview to a webhook: where its ``clientConfig`` leads,
TLS verified against its ``caBundle``, within its ``timeoutSeconds``.

``url`` webhooks are called at that URL. ``service`` webhooks are called as
kube-apiserver does, at ``https://<name>.<namespace>.svc:<port><path>``, the
server's certificate verified for the name ``<name>.<namespace>.svc``; what
differs is where the connection goes. kube-apiserver dials the Service's
ClusterIP, which its node routes. This API server runs on the host, where
ClusterIPs are not routed, so it resolves the Service the way kube-apiserver
does with ``--enable-aggregator-routing``: the Service port named by
``clientConfig.service.port`` gives a target port, the Service's
EndpointSlices (label ``kubernetes.io/service-name``) give the ready endpoint
addresses for that port, and the first ready address, in the slices' name
order, is dialled directly. The address must therefore be reachable from the
host, or, once `reach_pods` names the kubelet's pod CIDR and node namespace, an
address of the cluster network (a Pod, the node), dialled from a socket made in
the node's namespace, as kube-apiserver reaches pod IPs by its node's routes; or
an address given in a hand-made EndpointSlice such as ``127.0.0.1``. A Service
with no ready endpoint answers ``no endpoints available for service "<name>"``,
which the failure policy then handles.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

SERVICES = ("", "services")
ENDPOINT_SLICES = ("discovery.k8s.io", "endpointslices")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_RESPONSE = 3 * 1024 * 1024

Lookup = Callable[[tuple[str, str], str, str], "dict[str, Any] | None"]
Items = Callable[..., "Iterable[dict[str, Any]]"]


class CallError(Exception):
    """The webhook could not be called or answered unusably (kube's ErrCallingWebhook):
    the webhook's failurePolicy decides whether the request goes on."""


@dataclass(frozen=True)
class Target:
    """Where a call goes: the URL kube would name, and the address actually dialled."""

    url: str
    dial_url: str
    server_name: str | None = None
    host_header: str | None = None
    address: str | None = None
    """The endpoint address a service webhook resolved to."""


def _go_json_error(body: bytes, e: ValueError) -> str:
    text = body.lstrip()
    if text and chr(text[0]) not in '{["-0123456789tfn':
        return f"invalid character {chr(text[0])!r} looking for beginning of value"
    return str(e)


class WebhookClient:
    def __init__(self, lookup: Lookup, items: Items) -> None:
        self.lookup = lookup
        self.items = items
        self.cluster_network: tuple[ipaddress.IPv4Network, str] | None = None
        """(pod CIDR, node network namespace): endpoints in the CIDR are dialled from the
        node's namespace, as kube-apiserver reaches pod IPs through its node's routes."""

    def reach_pods(self, pod_cidr: ipaddress.IPv4Network, node_netns: str) -> None:
        """Dial endpoints in `pod_cidr` (the kubelet's pods, the node's own address) from
        `node_netns` instead of the host, where they are not routed."""
        self.cluster_network = (pod_cidr, node_netns)

    def _connector(self, target: Target) -> aiohttp.TCPConnector:
        netns = self._netns_for(target)
        if netns is None:
            return aiohttp.TCPConnector()

        def in_node(addr_info: Any) -> socket.socket:
            from localcluster.namespaces import socket_in_namespace

            family, type_, proto, _, _ = addr_info
            sock = socket_in_namespace(netns, family, type_, proto)
            sock.setblocking(False)
            return sock

        return aiohttp.TCPConnector(socket_factory=in_node)

    def _netns_for(self, target: Target) -> str | None:
        if self.cluster_network is None or target.address is None:
            return None
        cidr, netns = self.cluster_network
        try:
            inside = ipaddress.ip_address(target.address) in cidr
        except ValueError:
            return None
        return netns if inside else None

    def target(self, client_config: Mapping[str, Any], timeout: int) -> Target:
        query = f"?timeout={timeout}s"
        if client_config.get("url"):
            url = str(client_config["url"])
            return Target(url + query, url + query)
        service = client_config.get("service") or {}
        name, namespace = service.get("name", ""), service.get("namespace", "")
        port = int(service.get("port") or 443)
        path = service.get("path") or "/"
        host = f"{name}.{namespace}.svc"
        url = f"https://{host}:{port}{path}{query}"
        address, target_port = self._resolve(url, namespace, name, port)
        dial_host = f"[{address}]" if ":" in address else address
        return Target(url, f"https://{dial_host}:{target_port}{path}{query}", server_name=host,
                      host_header=f"{host}:{port}", address=address)

    def _resolve(self, url: str, namespace: str, name: str, port: int) -> tuple[str, int]:
        svc = self.lookup(SERVICES, namespace, name)
        if svc is None:
            raise CallError(f'failed to call webhook: Post "{url}": service "{name}" not found')
        ports = (svc.get("spec") or {}).get("ports") or []
        svc_port = next((p for p in ports if p.get("port") == port), None)
        if svc_port is None:
            raise CallError(f'failed to call webhook: Post "{url}": no service port {port} '
                            f'found for service "{name}"')
        port_name = svc_port.get("name") or ""
        slices = [s for s in self.items(ENDPOINT_SLICES, namespace)
                  if (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == name]
        for s in sorted(slices, key=lambda s: s["metadata"]["name"]):
            found = next((p.get("port") for p in s.get("ports") or []
                          if (p.get("name") or "") == port_name and p.get("port")), None)
            if found is None:
                continue
            for ep in s.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                for address in ep.get("addresses") or []:
                    return str(address), int(found)
        raise CallError(f'failed to call webhook: Post "{url}": no endpoints available for '
                        f'service "{name}"')

    @staticmethod
    def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
        """Trust the caBundle (base64 PEM, as in the object) or, without one, the system's."""
        if not ca_bundle:
            return ssl.create_default_context()
        try:
            pem = base64.b64decode(ca_bundle, validate=True).decode("ascii")
            return ssl.create_default_context(cadata=pem)
        except (binascii.Error, UnicodeDecodeError, ssl.SSLError, ValueError) as e:
            raise CallError("could not get REST client: unable to load root certificates: "
                            "unable to parse bytes as PEM block") from e

    async def post(self, client_config: Mapping[str, Any], review: Mapping[str, Any], *,
                   timeout: int) -> Any:
        """POST `review`; the decoded JSON answer, or CallError saying what went wrong."""
        ctx = self.tls_context(client_config.get("caBundle"))
        target = self.target(client_config, timeout)
        where = f'Post "{target.url}"'
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if target.host_header:
            headers["Host"] = target.host_header
        try:
            async with (
                asyncio.timeout(timeout),
                aiohttp.ClientSession(connector=self._connector(target)) as session,
                session.post(target.dial_url, data=json.dumps(review).encode(), headers=headers,
                             ssl=ctx, server_hostname=target.server_name) as resp,
            ):
                if (resp.content_length or 0) > MAX_RESPONSE:
                    raise CallError(f"failed to call webhook: {where}: the response is larger "
                                    f"than {MAX_RESPONSE} bytes")
                body = await resp.read()
                status = resp.status
        except TimeoutError as e:
            raise CallError(f"failed to call webhook: {where}: context deadline exceeded") from e
        except aiohttp.ClientConnectorCertificateError as e:
            raise CallError(f"failed to call webhook: {where}: {_tls_reason(e)}") from e
        except aiohttp.ClientConnectorError as e:
            raise CallError(f"failed to call webhook: {where}: dial tcp {e.host}:{e.port}: "
                            f"connect: {(e.strerror or str(e)).lower()}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise CallError(f"failed to call webhook: {where}: {e}") from e
        if not 200 <= status < 300:
            text = body.decode(errors="replace").strip()
            if status == 404:
                detail = "the server could not find the requested resource"
            else:
                detail = (f"an error on the server ({json.dumps(text)}) has prevented the "
                          "request from succeeding")
            raise CallError(f"failed to call webhook: {detail}")
        try:
            return json.loads(body)
        except ValueError as e:
            raise CallError("failed to call webhook: couldn't get version/kind; json parse "
                            f"error: {_go_json_error(body, e)}") from e


def _tls_reason(e: aiohttp.ClientConnectorCertificateError) -> str:
    cert_error = e.certificate_error
    message = getattr(cert_error, "verify_message", "") or str(cert_error)
    if "issuer" in message or "self-signed" in message or "self signed" in message:
        return "tls: failed to verify certificate: x509: certificate signed by unknown authority"
    if "hostname" in message or "IP address mismatch" in message:
        return f"tls: failed to verify certificate: x509: {message}"
    return f"tls: failed to verify certificate: {message}"

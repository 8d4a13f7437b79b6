"""A client connection's `Exchange` driven by hand: events in, commands out, on a
fake clock that the balancer and the retry budget share."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry

from mesh.identity.names import Identity
from mesh.metrics import ProxyMetrics
from mesh.proxy.balancer import Balancer
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.exchange import Exchange
from mesh.proxy.exchange_io import RESUME_CLIENT, ClientData, Command, Event, WriteClient
from mesh.proxy.exchanges import Exchanges, Route

DOMAIN = "cluster.local"
WEB_ID = Identity("default", "web", DOMAIN).dns_name
PEER = "10.0.0.9:40000"

GET = b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def endpoint(n: int, *, priority: int = 0) -> EndpointSpec:
    """The destination proxy of web's n-th pod."""
    return EndpointSpec(address=f"10.1.0.{n}:4143", target_port=8080, identity=WEB_ID,
                        priority=priority)


def service(*endpoints: EndpointSpec, name: str = "web") -> ServiceSpec:
    return ServiceSpec(name=f"{name}.default.svc.{DOMAIN}", address="10.96.0.10:80",
                       endpoints=list(endpoints))


class Script:
    """One client connection, handed over with reading paused, as `HttpOutbound.serve`
    does; `send` gives it an event at the fake clock's `now`."""

    def __init__(self, *endpoints: EndpointSpec, routed: bool = False,
                 request_timeout: float = 1.0, head_timeout: float = 10.0) -> None:
        self.now = 0.0
        self.metrics = ProxyMetrics(CollectorRegistry())
        self.service = service(*(endpoints or (endpoint(1),)))
        self.balancer = Balancer(self.service.endpoints, clock=self.clock,
                                 rng=random.Random(7), service=self.service.name,
                                 observer=self.metrics.failover)
        self.shared = Exchanges(self.metrics, request_timeout=request_timeout,
                                head_timeout=head_timeout,
                                own_identity=lambda: Identity("default", "client", DOMAIN),
                                clock=self.clock)
        # Routed: as on the outbound listener, each request names its service.
        target: ServiceSpec | Route = self.route if routed else self.service
        self.exchange = Exchange(self.shared, target, None if routed else self.balancer,
                                 peer=PEER)
        assert self.send(ClientData(b"")) == [RESUME_CLIENT]

    def route(self, authority: str) -> tuple[ServiceSpec, Balancer] | None:
        if authority.split(":")[0] == self.service.name:
            return self.service, self.balancer
        return None

    def clock(self) -> float:
        return self.now

    def send(self, event: Event) -> list[Command]:
        return self.exchange.handle(event, self.now)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(sample.value for family in self.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())


def proxy_error(command: Command) -> tuple[int, str]:
    """The status and the l5d-proxy-error of an error the proxy wrote to the client."""
    assert isinstance(command, WriteClient), command
    match = re.match(rb"HTTP/1.1 (\d{3}) .*\r\nl5d-proxy-error: ([^\r]*)\r\n", command.data)
    assert match is not None, command.data
    return int(match[1]), match[2].decode()

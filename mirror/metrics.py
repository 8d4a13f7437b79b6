"""The mirror controller's metrics, with Linkerd's service-mirror names and
labels: the gateway probe (`gateway_alive`, `gateway_probe_latency_ms`,
`gateway_probes_total`) and how many Services a link mirrors."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh.metrics import LATENCY_MS_BUCKETS

CLUSTER = ("target_cluster_name",)


@dataclass
class MirrorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.gateway_alive = Gauge("gateway_alive", "1 when the linked cluster's gateway "
                                   "answers its probe, by the Link's hysteresis", CLUSTER,
                                   registry=r)
        self.probe_latency = Histogram("gateway_probe_latency_ms", "Latency of successful "
                                       "gateway probes", CLUSTER, buckets=LATENCY_MS_BUCKETS,
                                       registry=r)
        self.probes = Counter("gateway_probes", "Gateway probes sent, by outcome",
                              (*CLUSTER, "probe_successful"), registry=r)
        self.mirrored_services = Gauge("mirrored_services", "Local mirror Services of the "
                                       "linked cluster", CLUSTER, registry=r)

"""mesh.inject: what injection adds to each kind of workload, that the result is valid
for the supported Kubernetes versions, that injecting twice changes nothing, that
uninject undoes it exactly, the config annotations and what is left alone."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.errors import ConfigError
from mesh.image import VERSION, reference
from mesh.inject import (
    INIT_CONTAINER,
    PROXY_CONTAINER,
    InjectSettings,
    Outcome,
    inject,
    uninject,
)
from mesh.proxy import envconfig
from tests.unit.test_install import VERSIONS

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SETTINGS = InjectSettings(service_cidrs=("10.96.0.0/16",), trust_anchors_pem=PEM,
                          trust_domain="example.org", cluster_domain="cluster.local")

POD_SPEC: dict[str, Any] = {
    "serviceAccountName": "web",
    "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}
TEMPLATE: dict[str, Any] = {"metadata": {"labels": {"app": "web"}}, "spec": POD_SPEC}
SELECTOR = {"matchLabels": {"app": "web"}}


def meta(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": "default"}


WORKLOADS: dict[str, dict[str, Any]] = {
    "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": meta("web"), "spec": POD_SPEC},
    "Deployment": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("web"),
                   "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    "ReplicaSet": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta("web"),
                   "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    "DaemonSet": {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta("web"),
                  "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    "StatefulSet": {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("web"),
                    "spec": {"selector": SELECTOR, "serviceName": "web",
                             "template": TEMPLATE}},
    "Job": {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta("once"),
            "spec": {"template": {"spec": {**POD_SPEC, "restartPolicy": "Never"}}}},
    "CronJob": {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta("nightly"),
                "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
                    "spec": {**POD_SPEC, "restartPolicy": "OnFailure"}}}}}},
}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def template_meta(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["metadata"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    return doc["spec"]["template"]["metadata"]


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_each_kind_is_injected_and_stays_valid(kind: str) -> None:
    original = copy.deepcopy(WORKLOADS[kind])
    out, reports = inject(WORKLOADS[kind], SETTINGS)
    assert WORKLOADS[kind] == original, "the input is left alone"
    assert [str(r) for r in reports] == [f"{kind.lower()}/{original['metadata']['name']} "
                                         "injected"]
    spec = pod_spec(out)
    assert [c["name"] for c in spec["initContainers"]] == [INIT_CONTAINER, PROXY_CONTAINER]
    assert [c["name"] for c in spec["containers"]] == ["web"]
    annotations = template_meta(out)["annotations"]
    assert annotations["meshgate.io/proxy-version"] == VERSION
    assert annotations["meshgate.io/inbound-port"] == "4143"
    for version in VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)


def test_the_init_container_makes_the_service_cidrs_local_with_net_admin_only() -> None:
    settings = InjectSettings(service_cidrs=("10.96.0.0/16", "fd00:96::/108"),
                              trust_anchors_pem=PEM)
    out, _ = inject(WORKLOADS["Deployment"], settings)
    init = pod_spec(out)["initContainers"][0]
    assert init["image"] == reference()
    assert init["args"] == ["proxy", "init", "--service-cidr", "10.96.0.0/16,fd00:96::/108"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN"], "drop": ["ALL"]}
    assert sc["runAsUser"] == 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
    assert "restartPolicy" not in init


def test_the_proxy_is_a_hardened_native_sidecar_probed_on_its_admin_port() -> None:
    out, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    proxy = pod_spec(out)["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["args"] == ["--log-level=info", "proxy", "run"]
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live"),
                        ("startupProbe", "/ready")):
        assert proxy[probe]["httpGet"] == {"path": path, "port": 4191}
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]


def test_the_proxy_proves_its_identity_with_a_projected_token_of_the_identity_audience(
        ) -> None:
    out, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    spec = pod_spec(out)
    volumes = {v["name"]: v for v in spec["volumes"]}
    source = volumes["meshgate-identity-token"]["projected"]["sources"][0]
    assert source["serviceAccountToken"]["audience"] == "identity.meshgate.io"
    assert volumes["meshgate-identity-end-entity"] == {
        "name": "meshgate-identity-end-entity", "emptyDir": {"medium": "Memory"}}
    env = {e["name"]: e for e in spec["initContainers"][1]["env"]}
    token_dir = next(m["mountPath"] for m in spec["initContainers"][1]["volumeMounts"]
                     if m["name"] == "meshgate-identity-token")
    token_path = source["serviceAccountToken"]["path"]
    assert env[envconfig.TOKEN_FILE]["value"] == f"{token_dir}/{token_path}"
    assert env["_pod_sa"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    assert env[envconfig.LOCAL_NAME]["value"] == (
        "$(_pod_sa).$(_pod_ns).serviceaccount.identity.meshgate.example.org")
    assert env[envconfig.TRUST_ANCHORS]["value"] == PEM
    assert env[envconfig.DESTINATION_SVC_ADDR]["value"] == (
        "meshgate-control-headless.meshgate.svc.cluster.local:8086")


def test_the_environment_the_injector_writes_is_a_proxy_config() -> None:
    out, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    proxy = pod_spec(out)["initContainers"][1]
    downward = {"_pod_name": "web-1", "_pod_ns": "default", "_pod_sa": "web"}
    env = {}
    for item in proxy["env"]:
        value = item.get("value") or downward[item["name"]]
        for name, known in downward.items():
            value = value.replace(f"$({name})", known)
        env[item["name"]] = value
    config, pem = envconfig.proxy_config(env)
    assert pem == PEM
    assert config.identity.name == "web.default.serviceaccount.identity.meshgate.example.org"
    assert str(config.identity.trust_bundle) == (
        "/var/run/meshgate/identity/end-entity/trust-bundle.pem")
    assert config.identity.server == config.destination.server == (  # type: ignore[union-attr]
        "https://meshgate-control-headless.meshgate.svc.cluster.local:8086")
    assert config.workload is not None and config.workload.pod == "web-1"
    assert config.inbound.listen == "0.0.0.0:4143"
    assert config.admin.listen == "0.0.0.0:4191"


def test_a_proxy_environment_lacking_variables_names_them() -> None:
    with pytest.raises(ConfigError, match="MESHGATE_PROXY_IDENTITY_LOCAL_NAME"):
        envconfig.proxy_config({})


def test_injecting_twice_changes_nothing() -> None:
    once, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    twice, reports = inject(once, SETTINGS)
    assert yaml.safe_dump(twice, sort_keys=False) == yaml.safe_dump(once, sort_keys=False)
    assert [str(r) for r in reports] == [
        "deployment/web skipped: already injected (it has a meshgate-proxy container)"]


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_uninject_removes_exactly_what_inject_added(kind: str) -> None:
    injected, _ = inject(WORKLOADS[kind], SETTINGS)
    out, reports = uninject(injected)
    assert out == WORKLOADS[kind]
    assert yaml.safe_dump(out, sort_keys=False) == yaml.safe_dump(WORKLOADS[kind],
                                                                  sort_keys=False)
    assert [r.outcome for r in reports] == [Outcome.UNINJECTED]


def test_the_workloads_own_init_containers_volumes_and_annotations_are_kept() -> None:
    doc = copy.deepcopy(WORKLOADS["Deployment"])
    spec = doc["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "migrate", "image": "app", "command": ["true"]}]
    spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    doc["spec"]["template"]["metadata"]["annotations"] = {"team": "web"}
    out, _ = inject(doc, SETTINGS)
    injected = out["spec"]["template"]
    assert [c["name"] for c in injected["spec"]["initContainers"]] == [
        INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    assert [v["name"] for v in injected["spec"]["volumes"]] == [
        "data", "meshgate-identity-end-entity", "meshgate-identity-token"]
    assert injected["metadata"]["annotations"]["team"] == "web"
    assert uninject(out)[0] == doc


def test_a_list_is_injected_item_by_item_and_what_is_not_a_workload_is_left() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta("web"),
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("settings"),
                  "data": {"a": "b"}}
    listed = {"apiVersion": "v1", "kind": "List",
              "items": [service, WORKLOADS["Deployment"], config_map]}
    out, reports = inject(listed, SETTINGS)
    assert [str(r) for r in reports] == ["service/web skipped: not a workload",
                                         "deployment/web injected",
                                         "configmap/settings skipped: not a workload"]
    assert out["items"][0] == service and out["items"][2] == config_map
    assert PROXY_CONTAINER in str(out["items"][1])
    assert uninject(out)[0] == listed


def test_inject_disabled_and_host_network_are_respected() -> None:
    disabled = copy.deepcopy(WORKLOADS["Deployment"])
    disabled["spec"]["template"]["metadata"]["annotations"] = {"meshgate.io/inject": "disabled"}
    out, reports = inject(disabled, SETTINGS)
    assert out == disabled
    assert str(reports[0]) == ("deployment/web skipped: it has the annotation "
                               "meshgate.io/inject: disabled")
    host = copy.deepcopy(WORKLOADS["Pod"])
    host["spec"]["hostNetwork"] = True
    out, reports = inject(host, SETTINGS)
    assert out == host and "hostNetwork" in str(reports[0])


def test_uninject_of_what_was_never_injected_says_so() -> None:
    out, reports = uninject(WORKLOADS["Pod"])
    assert out == WORKLOADS["Pod"]
    assert str(reports[0]) == "pod/web skipped: not injected"


def with_annotations(**annotations: str) -> dict[str, Any]:
    doc = copy.deepcopy(WORKLOADS["Deployment"])
    doc["spec"]["template"]["metadata"]["annotations"] = {
        f"config.meshgate.io/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return doc


def test_config_annotations_tune_the_proxy() -> None:
    doc = with_annotations(proxy_log_level="debug", proxy_cpu_request="250m",
                           proxy_cpu_limit="2", proxy_memory_request="128Mi",
                           proxy_memory_limit="1Gi", proxy_image="registry.local/mesh",
                           opaque_ports="5432, 7000-7002",
                           skip_outbound_ports="6379,11211")
    out, _ = inject(doc, SETTINGS)
    init, proxy = pod_spec(out)["initContainers"][:2]
    assert proxy["args"][0] == "--log-level=debug"
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "128Mi"},
                                  "limits": {"cpu": "2", "memory": "1Gi"}}
    assert proxy["image"] == init["image"] == f"registry.local/mesh:{VERSION}"
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env[envconfig.OUTBOUND_OPAQUE_PORTS] == "5432,7000,7001,7002"
    assert init["args"][-2:] == ["--skip-outbound-ports", "6379,11211"]
    for version in VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)
    pinned, _ = inject(with_annotations(proxy_image="registry.local/mesh:dev"), SETTINGS)
    assert pod_spec(pinned)["initContainers"][1]["image"] == "registry.local/mesh:dev"


@pytest.mark.parametrize(("annotation", "value", "message"), [
    ("proxy-log-level", "loud", "must be one of debug, info, warning, error"),
    ("proxy-memory-limit", "lots", "is not a quantity"),
    ("proxy-image", "Not An Image", "is not an image reference"),
    ("opaque-ports", "5432,http", "'http' is not a port"),
    ("skip-outbound-ports", "70000", "is not a port"),
    ("skip-inbound-ports", "admin", "is not a port"),
    ("trusted-gateways", "*", "after '\\*\\.' must come|write '\\*\\.' and a suffix"),
])
def test_a_bad_config_annotation_is_refused_naming_it(annotation: str, value: str,
                                                      message: str) -> None:
    doc = copy.deepcopy(WORKLOADS["Deployment"])
    doc["spec"]["template"]["metadata"]["annotations"] = {
        f"config.meshgate.io/{annotation}": value}
    with pytest.raises(ConfigError, match=f"deployment/web: annotation config.meshgate.io/"
                       f"{annotation}={value!r}.*{message}"):
        inject(doc, SETTINGS)


def test_trusted_gateways_reach_the_proxys_inbound_config() -> None:
    gateway = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.example.org"
    out, _ = inject(with_annotations(trusted_gateways=f"{gateway}, *.gw.example.org"),
                    SETTINGS)
    proxy = pod_spec(out)["initContainers"][1]
    env = {e["name"]: e.get("value", "x") for e in proxy["env"]}
    assert env[envconfig.INBOUND_TRUSTED_GATEWAYS] == f"{gateway},*.gw.example.org"
    config, _ = envconfig.proxy_config(env)
    assert config.inbound.trusted_gateways == [gateway, "*.gw.example.org"]
    plain, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    assert envconfig.INBOUND_TRUSTED_GATEWAYS not in {
        e["name"] for e in pod_spec(plain)["initContainers"][1]["env"]}


def test_the_pod_lets_the_proxy_bind_service_ports_below_1024() -> None:
    out, _ = inject(WORKLOADS["Deployment"], SETTINGS)
    assert pod_spec(out)["securityContext"] == {
        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}
    doc = copy.deepcopy(WORKLOADS["Deployment"])
    doc["spec"]["template"]["spec"]["securityContext"] = {
        "runAsNonRoot": True, "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start",
                                           "value": "80"}]}
    out, _ = inject(doc, SETTINGS)
    assert pod_spec(out)["securityContext"] == doc["spec"]["template"]["spec"][
        "securityContext"], "the workload's own setting stands"
    assert uninject(out)[0] == doc

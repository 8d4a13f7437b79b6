"""`meshgate install`/`uninstall` and deploy/: every rendered object valid against
Kubernetes' published OpenAPI schema (kubernetes-validate), the same objects as
``kubectl kustomize deploy/`` builds, the pods' hardening, ``--set`` and its bad
input, and the identity directory's anchor key kept out."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mesh.identity.ca import IssuerDir
from mesh.image import IMAGE, VERSION, reference
from mesh.manifests import CRDS, DEPLOY_DIR, containers

# The oldest Kubernetes meshgate supports, and the newest the schema library knows.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(*args: str) -> list[dict[str, Any]]:
    proc = meshgate("install", *args)
    assert proc.returncode == 0, proc.stderr
    return docs_of(proc.stdout)


def kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return docs_of(proc.stdout)


def key(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An identity directory whose anchor key has been moved offline."""
    out = tmp_path_factory.mktemp("identity") / "id"
    proc = meshgate("identity", "init", "--trust-domain", "cluster.local", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (out / "anchor.key").rename(out.parent / "anchor.key.offline")
    return out


@pytest.fixture(scope="module")
def installed(identity: Path) -> list[dict[str, Any]]:
    return render("--identity-dir", str(identity))


@pytest.fixture(scope="module")
def installed_ha(identity: Path) -> list[dict[str, Any]]:
    return render("--identity-dir", str(identity), "--ha")


def test_every_rendered_object_is_valid_for_supported_kubernetes(
        installed: list[dict[str, Any]], installed_ha: list[dict[str, Any]],
        identity: Path) -> None:
    tuned = render("--identity-dir", str(identity), "--set", "replicas=3",
                   "--set", "logLevel=debug", "--set", "gateway.resources.limits.memory=1Gi")
    crds = render("--crds")
    kinds = set()
    for doc in [*installed, *installed_ha, *tuned, *crds]:
        kinds.add(doc["kind"])
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
            "RoleBinding", "Secret", "ConfigMap", "Deployment", "Service",
            "PodDisruptionBudget", "CustomResourceDefinition"} <= kinds


def test_the_crds_carry_valid_schemas() -> None:
    for doc in render("--crds"):
        for version in doc["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            jsonschema.Draft4Validator.check_schema(schema)
            assert schema["type"] == "object"


def test_install_renders_what_kubectl_kustomize_builds(
        installed: list[dict[str, Any]]) -> None:
    from_identity = {("v1", "Secret", "meshgate", "meshgate-identity-issuer"),
                     ("v1", "ConfigMap", "meshgate", "meshgate-identity-trust-roots")}
    assert {key(d) for d in installed} - {key(d) for d in kustomize(DEPLOY_DIR)} == \
        from_identity
    assert [without_ca_bundle(d) for d in installed if key(d) not in from_identity] == \
        kustomize(DEPLOY_DIR)
    assert render("--crds") == kustomize(CRDS)


def without_ca_bundle(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` less the injector's caBundle, which install renders from the identity."""
    if doc["kind"] != "MutatingWebhookConfiguration":
        return doc
    doc = copy.deepcopy(doc)
    for hook in doc["webhooks"]:
        hook["clientConfig"].pop("caBundle", None)
    return doc


def test_the_injector_trusts_the_mesh_trust_bundle(installed: list[dict[str, Any]]) -> None:
    hook = next(d for d in installed if d["kind"] == "MutatingWebhookConfiguration")
    roots = next(d for d in installed if d["metadata"]["name"] ==
                 "meshgate-identity-trust-roots")
    assert hook["metadata"]["name"] == "meshgate-proxy-injector"
    (webhook,) = hook["webhooks"]
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]).decode() == \
        roots["data"]["ca-bundle.crt"]
    assert webhook["clientConfig"]["service"] == {
        "name": "meshgate-injector", "namespace": "meshgate", "path": "/inject", "port": 443}
    assert webhook["failurePolicy"] == "Ignore" and webhook["sideEffects"] == "None"


def test_ha_renders_what_an_overlay_of_the_ha_component_builds(
        tmp_path: Path, installed_ha: list[dict[str, Any]]) -> None:
    shutil.copytree(DEPLOY_DIR, tmp_path / "deploy", ignore=shutil.ignore_patterns(
        "Dockerfile"))
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../deploy"], "components": ["../deploy/ha"]}))
    built = {key(d): d for d in kustomize(overlay)}
    rendered = {key(d): without_ca_bundle(d) for d in installed_ha
                if d["kind"] not in ("Secret",)
                and d["metadata"]["name"] != "meshgate-identity-trust-roots"}
    assert rendered == built
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in installed_ha
                if d["kind"] == "Deployment"}
    assert replicas == {"meshgate-control": 2, "meshgate-gateway": 2, "meshgate-mirror": 1}
    assert sorted(d["metadata"]["name"] for d in installed_ha
                  if d["kind"] == "PodDisruptionBudget") == ["meshgate-control",
                                                             "meshgate-gateway"]


def test_the_image_is_named_in_one_place(installed: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((DEPLOY_DIR / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": IMAGE, "newTag": VERSION}]
    images = {c["image"] for d in installed for c in containers(d)}
    assert images == {reference()} == {f"{IMAGE}:{VERSION}"}


def test_every_pod_is_hardened_limited_and_probed(installed: list[dict[str, Any]]) -> None:
    deployments = [d for d in installed if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "meshgate-control", "meshgate-gateway", "meshgate-mirror"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == d["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers(d):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}
            if d["metadata"]["name"] != "meshgate-mirror":  # no admin endpoint: see mirror.yaml
                assert "readinessProbe" in c and "livenessProbe" in c


def test_the_gateway_service_is_what_link_discovers(installed: list[dict[str, Any]]) -> None:
    from mirror import gatewayservice

    service = next(d for d in installed if key(d) == ("v1", "Service", gatewayservice.NAMESPACE,
                                                      gatewayservice.NAME))
    assert service["spec"]["type"] == "LoadBalancer"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {gatewayservice.GATEWAY_PORT_NAME: 4143,
                     gatewayservice.PROBE_PORT_NAME: 4191}


def test_the_issuer_secret_holds_the_issuer_and_the_anchor_cert_only(
        installed: list[dict[str, Any]], identity: Path) -> None:
    secret = next(d for d in installed if d["kind"] == "Secret")
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    files = IssuerDir(identity)
    assert data == {"tls.crt": files.issuer_cert.read_bytes(),
                    "tls.key": files.issuer_key.read_bytes(),
                    "ca.crt": files.anchor_cert.read_bytes()}
    offline = (identity.parent / "anchor.key.offline").read_bytes()
    assert all(offline not in value for value in data.values())
    roots = next(d for d in installed if d["metadata"]["name"] == "meshgate-identity-trust-roots")
    assert roots["data"] == {"ca-bundle.crt": files.bundle.read_text()}


def test_another_trust_domain_is_rendered_where_the_components_read_it(
        tmp_path: Path) -> None:
    assert meshgate("identity", "init", "--trust-domain", "east.example",
                    "--out", str(tmp_path / "id")).returncode == 0
    docs = render("--identity-dir", str(tmp_path / "id"))
    control = next(d for d in docs if key(d)[1:] == ("Deployment", "meshgate", "meshgate-control"))
    assert "--trust-domain=east.example" in next(containers(control))["args"]
    config = next(d for d in docs if d["metadata"]["name"] == "meshgate-gateway-config")
    gateway = yaml.safe_load(config["data"]["gateway.yaml"])
    assert gateway["identity"]["name"] == ("meshgate-gateway.meshgate.serviceaccount.identity."
                                           "meshgate.east.example")
    assert "cluster.local" not in yaml.safe_dump(control["spec"]["template"]["spec"]["containers"])


def test_set_changes_the_documented_fields(identity: Path) -> None:
    docs = render("--identity-dir", str(identity), "--set", "image=registry.local/mg:dev",
                  "--set", "replicas=3", "--set", "logLevel=debug",
                  "--set", "control.resources.limits.memory=1Gi",
                  "--set", "mirror.resources.requests.cpu=10m")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert {c["image"] for d in docs for c in containers(d)} == {"registry.local/mg:dev"}
    assert {n: d["spec"]["replicas"] for n, d in deployments.items()} == {
        "meshgate-control": 3, "meshgate-gateway": 3, "meshgate-mirror": 1}
    for name in ("meshgate-control", "meshgate-gateway"):
        assert next(containers(deployments[name]))["args"][0] == "--log-level=debug"
    control = next(containers(deployments["meshgate-control"]))
    assert control["resources"]["limits"]["memory"] == "1Gi"
    assert next(containers(deployments["meshgate-mirror"]))["resources"]["requests"]["cpu"] \
        == "10m"


@pytest.mark.parametrize(("value", "message"), [
    ("replica=2", "unknown --set key 'replica'"),
    ("control.resources.limits.gpu=1", "unknown --set key 'control.resources.limits.gpu'"),
    ("replicas=0", "replicas='0' must be a whole number of at least 1"),
    ("logLevel=loud", "logLevel='loud' must be one of debug, info, warning, error"),
    ("gateway.resources.limits.memory=lots", "'lots' is not a quantity"),
    ("image=my image", "image='my image' is not an image reference"),
])
def test_set_refuses_bad_input_naming_it(identity: Path, value: str, message: str) -> None:
    proc = meshgate("install", "--identity-dir", str(identity), "--set", value)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert message in proc.stderr


def test_set_without_a_value_is_a_usage_error(identity: Path) -> None:
    proc = meshgate("install", "--identity-dir", str(identity), "--set", "replicas")
    assert proc.returncode == 2
    assert "'replicas' is not KEY=VALUE" in proc.stderr


def test_the_service_range_goes_into_meshgate_config(identity: Path,
                                                    installed: list[dict[str, Any]]) -> None:
    def config(docs: list[dict[str, Any]]) -> dict[str, str]:
        return next(d for d in docs if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == "meshgate-config")["data"]

    assert config(installed) == {"serviceCIDRs": ""}  # read from ServiceCIDR objects
    docs = render("--identity-dir", str(identity), "--service-cidr", "10.43.0.0/16,fd00::/108")
    assert config(docs) == {"serviceCIDRs": "10.43.0.0/16,fd00::/108"}


@pytest.mark.parametrize(("value", "message"), [
    ("10.43.0.0/33", "'10.43.0.0/33' is not a CIDR such as 10.96.0.0/12"),
    ("10.43.0.0/16,10.44.0.0/16", "at most one IPv4 and one IPv6 range"),
])
def test_a_bad_service_range_is_refused_naming_it(identity: Path, value: str,
                                                  message: str) -> None:
    proc = meshgate("install", "--identity-dir", str(identity), "--service-cidr", value)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert message in proc.stderr


def test_install_without_an_identity_dir_says_how_to_make_one() -> None:
    proc = meshgate("install")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "install needs --identity-dir DIR" in proc.stderr
    assert "meshgate identity init --trust-domain cluster.local --out DIR" in proc.stderr


def test_install_with_a_missing_identity_dir_names_it(tmp_path: Path) -> None:
    proc = meshgate("install", "--identity-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert f"identity directory {tmp_path / 'nowhere'} does not exist" in proc.stderr


def test_crds_are_rendered_alone() -> None:
    proc = meshgate("install", "--crds", "--ha")
    assert proc.returncode == 2
    assert "--crds prints only the CustomResourceDefinitions" in proc.stderr


def test_uninstall_lists_everything_in_the_order_to_delete(
        installed: list[dict[str, Any]]) -> None:
    proc = meshgate("uninstall")
    assert proc.returncode == 0, proc.stderr
    docs = docs_of(proc.stdout)
    assert sorted(map(key, docs)) == sorted(map(key, installed))
    order = [key(d)[1] for d in docs]
    assert order[-1] == "Namespace"
    assert order.index("Deployment") < order.index("ServiceAccount")
    assert all(set(d) == {"apiVersion", "kind", "metadata"} for d in docs)
    with_crds = docs_of(meshgate("uninstall", "--crds").stdout)
    assert [key(d) for d in with_crds[len(docs):]] == [key(d) for d in render("--crds")]

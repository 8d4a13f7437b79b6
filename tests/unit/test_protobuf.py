"""Kubernetes protobuf request bodies decoded into the JSON-shaped dicts the API uses.

The golden bodies below are byte-for-byte what kubectl v1.37.1 (`.venv/bin/kubectl`)
sent: it was pointed with `--server=http://127.0.0.1:PORT` at a plain-HTTP
recording proxy in front of a `meshgate cluster serve` instance (which answered
discovery), and each request body was saved as hex. The commands are quoted
next to each body. The expected dicts are what `kubectl create ... --dry-run=client
-o json` prints for the same command, less the empty `spec: {}` / `status: {}`
that JSON carries and the decoder leaves out.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localcluster import protobuf
from localcluster.errors import ApiError

RBAC = "rbac.authorization.k8s.io/v1"

# ---------------------------------------------------------------- golden bodies

GOLDEN: dict[str, tuple[str, dict[str, Any]]] = {
    # kubectl create namespace demo
    "namespace": (
        "6b3873000a0f0a02763112094e616d657370616365121c0a140a0464656d6f12001a0022002a00320038"
        "00420012001a020a001a002200",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
    ),
    # kubectl create configmap cfg -n demo --from-literal=a=b --from-literal=greeting=hello
    "configmap": (
        "6b3873000a0f0a0276311209436f6e6669674d617012340a170a0363666712001a0464656d6f22002a00"
        "32003800420012060a016112016212110a086772656574696e67120568656c6c6f1a002200",
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "cfg", "namespace": "demo"},
         "data": {"a": "b", "greeting": "hello"}},
    ),
    # kubectl create configmap cfg2 -n demo --from-file=/etc/hostname   (content "vm\n")
    "configmap-from-file": (
        "6b3873000a0f0a0276311209436f6e6669674d6170122b0a180a046366673212001a0464656d6f22002a"
        "00320038004200120f0a08686f73746e616d651203766d0a1a002200",
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "cfg2", "namespace": "demo"}, "data": {"hostname": "vm\n"}},
    ),
    # kubectl create secret generic sec -n demo --from-literal=password=s3cr3t
    #   --from-literal=user=admin
    "secret": (
        "6b3873000a0c0a0276311206536563726574123e0a170a0373656312001a0464656d6f22002a00320038"
        "00420012120a0870617373776f72641206733363723374120d0a0475736572120561646d696e1a001a00"
        "2200",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec", "namespace": "demo"},
         "data": {"password": "czNjcjN0", "user": "YWRtaW4="}},
    ),
    # kubectl create secret generic sec2 -n demo --type=kubernetes.io/basic-auth
    #   --from-literal=username=x
    "secret-typed": (
        "6b3873000a0c0a027631120653656372657412430a180a047365633212001a0464656d6f22002a003200"
        "38004200120d0a08757365726e616d651201781a186b756265726e657465732e696f2f62617369632d61"
        "7574681a002200",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec2", "namespace": "demo"},
         "data": {"username": "eA=="}, "type": "kubernetes.io/basic-auth"},
    ),
    # kubectl create serviceaccount robot -n demo
    "serviceaccount": (
        "6b3873000a140a027631120e536572766963654163636f756e74121b0a190a05726f626f7412001a0464"
        "656d6f22002a003200380042001a002200",
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "robot", "namespace": "demo"}},
    ),
    # kubectl create token robot -n demo --audience=https://example.com --audience=vault
    #   --duration=10m
    "token": (
        "6b3873000a280a1861757468656e7469636174696f6e2e6b38732e696f2f7631120c546f6b656e526571"
        "7565737412390a100a0012001a0022002a00320038004200121f0a1368747470733a2f2f6578616d706c"
        "652e636f6d0a057661756c7420d8041a040a0012001a002200",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"audiences": ["https://example.com", "vault"], "expirationSeconds": 600}},
    ),
    # kubectl create token robot -n demo --bound-object-kind=Pod --bound-object-name=p1
    #   --bound-object-uid=1234-abcd
    "token-bound": (
        "6b3873000a280a1861757468656e7469636174696f6e2e6b38732e696f2f7631120c546f6b656e526571"
        "7565737412340a100a0012001a0022002a00320038004200121a1a180a03506f64120276311a02703122"
        "09313233342d616263641a040a0012001a002200",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p1",
                                     "uid": "1234-abcd"}}},
    ),
    # kubectl create role reader -n demo --verb=get,list,watch --resource=pods,configmaps
    #   --resource-name=cfg
    "role": (
        "6b3873000a240a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f76311204526f6c65"
        "12490a1a0a0672656164657212001a0464656d6f22002a00320038004200122b0a036765740a046c6973"
        "740a05776174636812001a04706f64731a0a636f6e6669676d61707322036366671a002200",
        {"apiVersion": RBAC, "kind": "Role",
         "metadata": {"name": "reader", "namespace": "demo"},
         "rules": [{"verbs": ["get", "list", "watch"], "apiGroups": [""],
                    "resources": ["pods", "configmaps"], "resourceNames": ["cfg"]}]},
    ),
    # kubectl create rolebinding reader-binding -n demo --role=reader --user=alice
    #   --group=devs --serviceaccount=demo:robot
    "rolebinding": (
        "6b3873000a2b0a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f7631120b526f6c65"
        "42696e64696e6712c8010a220a0e7265616465722d62696e64696e6712001a0464656d6f22002a003200"
        "38004200122a0a04557365721219726261632e617574686f72697a6174696f6e2e6b38732e696f1a0561"
        "6c6963652200122a0a0547726f75701219726261632e617574686f72697a6174696f6e2e6b38732e696f"
        "1a04646576732200121f0a0e536572766963654163636f756e7412001a05726f626f74220464656d6f1a"
        "290a19726261632e617574686f72697a6174696f6e2e6b38732e696f1204526f6c651a06726561646572"
        "1a002200",
        {"apiVersion": RBAC, "kind": "RoleBinding",
         "metadata": {"name": "reader-binding", "namespace": "demo"},
         "subjects": [
             {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"},
             {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "devs"},
             {"kind": "ServiceAccount", "name": "robot", "namespace": "demo"}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "reader"}},
    ),
    # kubectl create clusterrole cr --verb=get,list --resource=namespaces
    "clusterrole": (
        "6b3873000a2b0a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f7631120b436c7573"
        "746572526f6c65122f0a120a02637212001a0022002a0032003800420012190a036765740a046c697374"
        "12001a0a6e616d657370616365731a002200",
        {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": "cr"},
         "rules": [{"verbs": ["get", "list"], "apiGroups": [""],
                    "resources": ["namespaces"]}]},
    ),
    # kubectl create clusterrole cr2 --verb=get --non-resource-url=/healthz
    #   --non-resource-url=/version
    "clusterrole-nonresource": (
        "6b3873000a2b0a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f7631120b436c7573"
        "746572526f6c6512300a130a0363723212001a0022002a0032003800420012190a036765742a082f6865"
        "616c74687a2a082f76657273696f6e1a002200",
        {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": "cr2"},
         "rules": [{"verbs": ["get"], "nonResourceURLs": ["/healthz", "/version"]}]},
    ),
    # kubectl create clusterrole agg
    #   --aggregation-rule=rbac.example.com/aggregate-to-monitoring=true
    "clusterrole-aggregated": (
        "6b3873000a2b0a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f7631120b436c7573"
        "746572526f6c65124b0a130a0361676712001a0022002a003200380042001a340a320a300a2872626163"
        "2e6578616d706c652e636f6d2f6167677265676174652d746f2d6d6f6e69746f72696e67120474727565"
        "1a002200",
        {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": "agg"},
         "aggregationRule": {"clusterRoleSelectors": [
             {"matchLabels": {"rbac.example.com/aggregate-to-monitoring": "true"}}]}},
    ),
    # kubectl create clusterrolebinding crb --clusterrole=cr --user=bob
    "clusterrolebinding": (
        "6b3873000a320a1c726261632e617574686f72697a6174696f6e2e6b38732e696f2f76311212436c7573"
        "746572526f6c6542696e64696e67126d0a130a0363726212001a0022002a0032003800420012280a0455"
        "7365721219726261632e617574686f72697a6174696f6e2e6b38732e696f1a03626f6222001a2c0a1972"
        "6261632e617574686f72697a6174696f6e2e6b38732e696f120b436c7573746572526f6c651a0263721a"
        "002200",
        {"apiVersion": RBAC, "kind": "ClusterRoleBinding", "metadata": {"name": "crb"},
         "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "bob"}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "cr"}},
    ),
    # kubectl create service clusterip web -n demo --tcp=80:8080 --tcp=443:https
    "service": (
        "6b3873000a0d0a0276311207536572766963651291010a230a0377656212001a0464656d6f22002a0032"
        "00380042005a0a0a03617070120377656212660a1b0a0738302d38303830120354435018502207080010"
        "903f1a0028000a220a093434332d6874747073120354435018bb03220b080110001a0568747470732800"
        "120a0a0361707012037765621a002209436c757374657249503a00420052005a00600068001a020a001a"
        "002200",
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "demo", "labels": {"app": "web"}},
         "spec": {"ports": [
             {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
             {"name": "443-https", "protocol": "TCP", "port": 443, "targetPort": "https"}],
             "selector": {"app": "web"}, "type": "ClusterIP"}},
    ),
    # kubectl auth can-i create pods -n demo
    "selfsubjectaccessreview": (
        "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a65"
        "6374416363657373526576696577123c0a100a0012001a0022002a00320038004200121e0a1c0a046465"
        "6d6f12066372656174651a0022002a04706f647332003a001a08080012001a0020001a002200",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
         "spec": {"resourceAttributes": {"namespace": "demo", "verb": "create",
                                         "resource": "pods"}}},
    ),
    # kubectl auth can-i get /healthz
    "selfsubjectaccessreview-nonresource": (
        "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a65"
        "6374416363657373526576696577122f0a100a0012001a0022002a003200380042001211120f0a082f68"
        "65616c74687a12036765741a08080012001a0020001a002200",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
         "spec": {"nonResourceAttributes": {"path": "/healthz", "verb": "get"}}},
    ),
    # kubectl auth can-i --list -n demo
    "selfsubjectrulesreview": (
        "6b3873000a310a17617574686f72697a6174696f6e2e6b38732e696f2f7631121653656c665375626a65"
        "637452756c657352657669657712200a100a0012001a0022002a0032003800420012060a0464656d6f1a"
        "04180022001a002200",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
         "spec": {"namespace": "demo"}},
    ),
    # kubectl auth whoami
    "selfsubjectreview": (
        "6b3873000a2d0a1861757468656e7469636174696f6e2e6b38732e696f2f7631121153656c665375626a"
        "656374526576696577121a0a100a0012001a0022002a0032003800420012060a040a0012001a002200",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    ),
    # kubectl create deployment web -n demo --image=nginx --replicas=2
    "deployment": (
        "6b3873000a150a07617070732f7631120a4465706c6f796d656e7412af010a230a0377656212001a0464"
        "656d6f22002a003200380042005a0a0a036170701203776562127a0802120c0a0a0a0361707012037765"
        "621a600a1c0a0012001a0022002a003200380042005a0a0a036170701203776562124012220a056e6769"
        "6e7812056e67696e782a0042006a007200800100880100900100a201001a00320042004a005200580060"
        "0068008201008a01009a0100c2010022020a00280038001a0c0800100018002000280038001a002200",
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "web", "namespace": "demo", "labels": {"app": "web"}},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                  "template": {"metadata": {"labels": {"app": "web"}},
                               "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}},
    ),
}

# Kinds kubectl sends as protobuf that have no schema here.
UNSUPPORTED: dict[str, tuple[str, str]] = {
    # kubectl create quota q -n demo --hard=pods=2
    "resourcequota": (
        "6b3873000a130a027631120d5265736f7572636551756f746112280a150a017112001a0464656d6f2200"
        "2a00320038004200120d0a0b0a04706f647312030a01321a001a002200",
        "v1 ResourceQuota",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_kubectl_bodies(name: str) -> None:
    body, expected = GOLDEN[name]
    decoded = protobuf.decode(bytes.fromhex(body))
    assert decoded == expected
    assert json.loads(json.dumps(decoded)) == decoded


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_kinds_are_415(name: str) -> None:
    body, what = UNSUPPORTED[name]
    with pytest.raises(ApiError) as info:
        protobuf.decode(bytes.fromhex(body))
    err = info.value
    assert (err.code, err.reason) == (415, "UnsupportedMediaType")
    assert what in err.message
    assert "only accepted for" in err.message and "v1/ConfigMap" in err.message
    assert "application/json" in err.message
    assert err.status()["code"] == 415


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_truncation_of_a_golden_body_is_an_api_error_or_decodes(name: str) -> None:
    body = bytes.fromhex(GOLDEN[name][0])
    for end in range(len(body)):
        try:
            result = protobuf.decode(body[:end])
        except ApiError as e:
            assert e.code in (400, 415)
        else:
            assert isinstance(result, dict)


def test_one_byte_short_is_a_400_naming_protobuf() -> None:
    body = bytes.fromhex(GOLDEN["configmap"][0])
    with pytest.raises(ApiError) as info:
        protobuf.decode(body[:-1])
    assert info.value.code == 400
    assert "protobuf" in info.value.message


# ---------------------------------------------------------------- a small encoder


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vi(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def ld(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def entry(key: str, value: bytes | str) -> bytes:
    return ld(1, key) + ld(2, value)


def envelope(api_version: str, kind: str, raw: bytes, *, encoding: str = "",
             magic: bytes = b"k8s\x00") -> bytes:
    type_meta = ld(1, api_version) + ld(2, kind)
    return magic + ld(1, type_meta) + ld(2, raw) + ld(3, encoding) + ld(4, "")


def meta(**fields: str) -> bytes:
    numbers = {"name": 1, "generateName": 2, "namespace": 3, "uid": 5, "resourceVersion": 6}
    return ld(1, b"".join(ld(numbers[k], v) for k, v in fields.items()))


def decode(api_version: str, kind: str, raw: bytes) -> dict[str, Any]:
    return protobuf.decode(envelope(api_version, kind, raw))


def bad_request(body: bytes) -> str:
    with pytest.raises(ApiError) as info:
        protobuf.decode(body)
    assert (info.value.code, info.value.reason) == (400, "BadRequest")
    assert "protobuf" in info.value.message
    return info.value.message


# ---------------------------------------------------------------- ObjectMeta and friends


def test_full_object_meta() -> None:
    owner = (ld(5, "apps/v1") + ld(1, "ReplicaSet") + ld(3, "rs") + ld(4, "u-1")
             + vi(6, 1) + vi(7, 0))
    object_meta = (
        ld(1, "cfg") + ld(2, "cfg-") + ld(3, "ns") + ld(4, "") + ld(5, "uid-1") + ld(6, "42")
        + vi(7, 3) + ld(8, vi(1, 1_700_000_000) + vi(2, 123)) + ld(9, b"") + vi(10, 0)
        + ld(11, entry("app", "web")) + ld(11, entry("tier", ""))
        + ld(12, entry("note", "x")) + ld(13, owner) + ld(14, "a/b") + ld(14, "c")
        + ld(17, ld(1, "kubectl"))  # managedFields: not in the table, skipped
    )
    obj = decode("v1", "ConfigMap", ld(1, object_meta))
    assert obj["metadata"] == {
        "name": "cfg", "generateName": "cfg-", "namespace": "ns", "uid": "uid-1",
        "resourceVersion": "42", "generation": 3, "creationTimestamp": "2023-11-14T22:13:20Z",
        "deletionGracePeriodSeconds": 0, "labels": {"app": "web", "tier": ""},
        "annotations": {"note": "x"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                             "uid": "u-1", "controller": True, "blockOwnerDeletion": False}],
        "finalizers": ["a/b", "c"],
    }


def test_zero_time_is_left_out_and_epoch_plus_nanos_is_kept() -> None:
    assert "metadata" not in decode("v1", "Namespace", ld(1, ld(8, b"")))
    obj = decode("v1", "Namespace", ld(1, ld(8, vi(2, 5))))
    assert obj["metadata"] == {"creationTimestamp": "1970-01-01T00:00:00Z"}
    obj = decode("v1", "Namespace", ld(1, ld(8, vi(1, -1))))
    assert obj["metadata"] == {"creationTimestamp": "1969-12-31T23:59:59Z"}


def test_time_out_of_range_is_400() -> None:
    body = envelope("v1", "Namespace", ld(1, ld(8, vi(1, 10**15))))
    assert "out of range" in bad_request(body)


def test_repeated_embedded_message_merges() -> None:
    raw = meta(name="a") + meta(namespace="ns") + ld(1, ld(11, entry("k", "v")))
    obj = decode("v1", "ServiceAccount", raw)
    assert obj["metadata"] == {"name": "a", "namespace": "ns", "labels": {"k": "v"}}


def test_map_entries_duplicate_keys_last_wins_and_missing_parts_are_empty() -> None:
    raw = (meta(name="c") + ld(2, entry("k", "1")) + ld(2, entry("k", "2"))
           + ld(2, ld(1, "nokey-value")) + ld(2, ld(2, "no-key")))
    assert decode("v1", "ConfigMap", raw)["data"] == {"k": "2", "nokey-value": "", "": "no-key"}


def test_invalid_utf8_becomes_replacement_character() -> None:
    obj = decode("v1", "Namespace", ld(1, ld(1, b"a\xffb")))
    assert obj["metadata"]["name"] == "a\ufffdb"


# ---------------------------------------------------------------- kinds


def test_configmap_binary_data_and_immutable_false_are_kept() -> None:
    raw = meta(name="c") + vi(4, 0) + ld(3, entry("bin", b"\x00\xff"))
    assert decode("v1", "ConfigMap", raw) == {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
        "immutable": False, "binaryData": {"bin": "AP8="}}


def test_secret_string_data_immutable_and_empty_value() -> None:
    raw = (meta(name="s") + vi(5, 1) + ld(2, entry("empty", b"")) + ld(4, entry("a", "b"))
           + ld(3, "Opaque"))
    assert decode("v1", "Secret", raw) == {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "immutable": True,
        "data": {"empty": ""}, "stringData": {"a": "b"}, "type": "Opaque"}


def test_service_account_references_and_automount_false() -> None:
    raw = (meta(name="sa") + ld(2, ld(1, "Secret") + ld(3, "tok") + ld(7, ""))
           + ld(3, ld(1, "pull")) + vi(4, 0))
    assert decode("v1", "ServiceAccount", raw) == {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"},
        "secrets": [{"kind": "Secret", "name": "tok"}], "imagePullSecrets": [{"name": "pull"}],
        "automountServiceAccountToken": False}


def test_namespace_spec_and_status() -> None:
    raw = meta(name="n") + ld(2, ld(1, "kubernetes")) + ld(3, ld(1, "Active"))
    assert decode("v1", "Namespace", raw) == {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def test_service_spec_fields() -> None:
    port = (ld(1, "http") + ld(2, "TCP") + ld(6, "") + vi(3, 80)
            + ld(4, vi(1, 0) + vi(2, 0) + ld(3, "")) + vi(5, 30080))
    spec = (ld(1, port) + ld(3, "None") + ld(18, "None") + ld(4, "NodePort")
            + ld(5, "1.2.3.4") + ld(7, "ClientIP") + ld(10, "") + ld(11, "Local")
            + vi(12, 0) + vi(13, 1) + ld(14, ld(1, vi(1, 0))) + ld(19, "IPv4")
            + ld(17, "SingleStack") + vi(20, 0) + ld(22, "Cluster") + ld(23, "PreferClose")
            + ld(3, "None"))
    obj = decode("v1", "Service", meta(name="svc") + ld(2, spec) + ld(3, ld(1, b"")))
    assert obj["spec"] == {
        "ports": [{"name": "http", "protocol": "TCP", "appProtocol": "", "port": 80,
                   "nodePort": 30080}],
        "clusterIP": "None", "clusterIPs": ["None"], "type": "NodePort",
        "externalIPs": ["1.2.3.4"], "sessionAffinity": "ClientIP",
        "externalTrafficPolicy": "Local", "publishNotReadyAddresses": True,
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack", "allocateLoadBalancerNodePorts": False,
        "internalTrafficPolicy": "Cluster"}
    assert "status" not in obj


def test_negative_numbers_use_twos_complement() -> None:
    port = vi(3, -1) + ld(4, vi(1, 0) + vi(2, -8))
    obj = decode("v1", "Service", ld(2, ld(1, port)))
    assert obj["spec"]["ports"] == [{"port": -1, "targetPort": -8}]


def test_int_or_string_with_unknown_type_is_400() -> None:
    body = envelope("v1", "Service", ld(2, ld(1, ld(4, vi(1, 2)))))
    assert "IntOrString" in bad_request(body)


def test_token_review_and_subject_access_reviews() -> None:
    review = decode("authentication.k8s.io/v1", "TokenReview",
                    ld(2, ld(1, "abc") + ld(2, "api")))
    assert review["spec"] == {"token": "abc", "audiences": ["api"]}
    extra = ld(5, ld(1, "scopes") + ld(2, ld(1, "a") + ld(1, "") + ld(2, "ignored")))
    spec = (ld(1, ld(1, "ns") + ld(2, "get") + ld(3, "apps") + ld(4, "v1")
                  + ld(5, "deployments") + ld(6, "scale") + ld(7, "web"))
            + ld(3, "alice") + ld(4, "devs") + extra + ld(6, "u1"))
    for kind in ("SubjectAccessReview", "LocalSubjectAccessReview"):
        obj = decode("authorization.k8s.io/v1", kind, meta(namespace="ns") + ld(2, spec))
        assert obj == {
            "apiVersion": "authorization.k8s.io/v1", "kind": kind,
            "metadata": {"namespace": "ns"},
            "spec": {"resourceAttributes": {"namespace": "ns", "verb": "get", "group": "apps",
                                            "version": "v1", "resource": "deployments",
                                            "subresource": "scale", "name": "web"},
                     "user": "alice", "groups": ["devs"], "extra": {"scopes": ["a", ""]},
                     "uid": "u1"}}


def test_label_selector_match_expressions() -> None:
    selector = ld(2, ld(1, "tier") + ld(2, "In") + ld(3, "web") + ld(3, "api"))
    obj = decode(RBAC, "ClusterRole", meta(name="agg") + ld(3, ld(1, selector)))
    assert obj["aggregationRule"] == {"clusterRoleSelectors": [
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]}]}


# ---------------------------------------------------------------- DeleteOptions


@pytest.mark.parametrize("api_version", ["v1", "meta.k8s.io/v1", RBAC])
def test_delete_options_keep_meaningful_zeros(api_version: str) -> None:
    raw = (vi(1, 0) + ld(2, ld(1, "uid-1") + ld(2, "")) + vi(3, 0) + ld(4, "Foreground")
           + ld(5, "All"))
    assert decode(api_version, "DeleteOptions", raw) == {
        "apiVersion": api_version, "kind": "DeleteOptions", "gracePeriodSeconds": 0,
        "preconditions": {"uid": "uid-1", "resourceVersion": ""}, "orphanDependents": False,
        "propagationPolicy": "Foreground", "dryRun": ["All"]}


def test_delete_options_unset_pointers_stay_unset() -> None:
    assert decode("v1", "DeleteOptions", b"") == {"apiVersion": "v1", "kind": "DeleteOptions"}


# ---------------------------------------------------------------- forward compatibility


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (vi(99, 7) + varint(98 << 3 | 1) + b"\x01" * 8 + ld(97, "x")
               + varint(96 << 3 | 5) + b"\x02" * 4)
    raw = meta(name="cfg") + unknown + ld(1, unknown) + ld(2, entry("a", "b") + vi(3, 1))
    assert decode("v1", "ConfigMap", raw) == {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
        "data": {"a": "b"}}


def test_unknown_envelope_fields_are_skipped() -> None:
    body = envelope("v1", "Namespace", meta(name="n")) + vi(15, 1)
    assert protobuf.decode(body)["metadata"] == {"name": "n"}


# ---------------------------------------------------------------- malformed input


def test_wrong_or_missing_magic() -> None:
    assert "magic" in bad_request(b"")
    assert "magic" in bad_request(b"k8s")
    assert "magic" in bad_request(envelope("v1", "Namespace", b"", magic=b"k8s\x01"))
    assert "magic" in bad_request(b'{"apiVersion": "v1", "kind": "Namespace"}')


def test_wire_type_mismatch_names_the_field() -> None:
    message = bad_request(envelope("v1", "Namespace", ld(1, vi(1, 5))))
    assert "ObjectMeta.name" in message and "wire type" in message
    assert "ObjectMeta.generation" in bad_request(envelope("v1", "Namespace",
                                                           ld(1, ld(7, "x"))))
    assert "map entry" in bad_request(envelope("v1", "ConfigMap", ld(2, vi(1, 1))))


@pytest.mark.parametrize(("body", "what"), [
    (b"k8s\x00" + varint(1 << 3 | 3), "start-group"),
    (b"k8s\x00" + varint(1 << 3 | 7), "wire type 7"),
    (b"k8s\x00" + b"\x80" * 11, "varint"),
    (b"k8s\x00" + b"\x0a\x05ab", "long"),
    (b"k8s\x00" + b"\x00\x00", "field number 0"),
    (b"k8s\x00" + b"\x09\x01\x02", "truncated 64-bit"),
    (b"k8s\x00" + b"\x0d\x01", "truncated 32-bit"),
])
def test_malformed_wire_data(body: bytes, what: str) -> None:
    assert what in bad_request(body)


def test_envelope_without_kind_or_with_content_encoding() -> None:
    assert "no kind" in bad_request(b"k8s\x00" + ld(2, b""))
    assert "gzip" in bad_request(envelope("v1", "Namespace", b"", encoding="gzip"))


# ---------------------------------------------------------------- schema sanity


def test_every_supported_kind_has_a_message_and_unique_json_names() -> None:
    for message in protobuf.SUPPORTED.values():
        assert message in protobuf.SCHEMA
    for message, fields in protobuf.SCHEMA.items():
        names = [name for name, _ in fields.values()]
        assert len(names) == len(set(names)), message
    assert "v1/Namespace" in protobuf.supported_kinds()
    assert "*/DeleteOptions" in protobuf.supported_kinds()


# ---------------------------------------------------------------- fuzzing


def _only_api_errors(body: bytes) -> None:
    try:
        result = protobuf.decode(body)
    except ApiError as e:
        assert e.code in (400, 415)
    else:
        json.dumps(result)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_api_errors(body: bytes) -> None:
    _only_api_errors(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_magic_raise_only_api_errors(body: bytes) -> None:
    _only_api_errors(b"k8s\x00" + body)


_KINDS = [*sorted(protobuf.SUPPORTED), ("v1", "DeleteOptions")]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(_KINDS), st.binary(max_size=300))
def test_arbitrary_raw_objects_raise_only_api_errors(kind: tuple[str, str], raw: bytes) -> None:
    _only_api_errors(envelope(kind[0], kind[1], raw))


_FIELD = st.tuples(st.integers(1, 20), st.sampled_from([0, 1, 2, 5]),
                   st.integers(0, 2**64 - 1), st.binary(max_size=40))


@st.composite
def _messages(draw: st.DrawFn, depth: int = 2) -> bytes:
    """Well-formed protobuf with random fields, nested a few levels, so that
    the fuzzing gets past the wire reader into the schema."""
    out = bytearray()
    for number, wire, number_value, blob in draw(st.lists(_FIELD, max_size=8)):
        if wire == 0:
            out += vi(number, number_value)
        elif wire == 2:
            inner = draw(_messages(depth - 1)) if depth and draw(st.booleans()) else blob
            out += ld(number, inner)
        else:
            size = 8 if wire == 1 else 4
            out += varint(number << 3 | wire) + number_value.to_bytes(8, "little")[:size]
    return bytes(out)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(_KINDS), _messages(3))
def test_structured_random_objects_raise_only_api_errors(kind: tuple[str, str],
                                                         raw: bytes) -> None:
    _only_api_errors(envelope(kind[0], kind[1], raw))

#!/usr/bin/env bash
# `make kind-demo`: meshgate on two kind clusters, east and west, linked both ways,
# with east's client calling west's web across the gateways. Needs kind, docker and
# kubectl on PATH and meshgate installed (`make venv`, then .venv/bin on PATH).
# `make kind-demo-down` deletes both clusters. The same commands, but for the kind
# and docker ones, are what the tests run against the embedded clusters.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
work=${MESHGATE_KIND_DIR:-$root/build/kind-demo}
image=$(python3 -c 'import mesh.image as i; print(i.reference())')

for tool in kind docker kubectl meshgate; do
    command -v "$tool" >/dev/null || { echo "kind-demo: $tool is not on PATH" >&2; exit 1; }
done
mkdir -p "$work"

# 1. One trust anchor for both clusters; its key stays here.
[ -d "$work/id" ] || meshgate identity init --trust-domain cluster.local --out "$work/id"

# 2. The clusters (distinct pod and service ranges), and meshgate's image in both.
docker build -f "$root/deploy/Dockerfile" -t "$image" "$root"
for c in east west; do
    kind get clusters | grep -qx "$c" || kind create cluster --config "$here/$c.yaml"
    kind load docker-image "$image" --name "$c"
    kind get kubeconfig --name "$c" > "$work/$c.kubeconfig"
done
east=$work/east.kubeconfig
west=$work/west.kubeconfig

# 3. Install, then check, in each.
for kc in "$east" "$west"; do
    meshgate check --pre --kubeconfig "$kc"
    meshgate install --crds | kubectl --kubeconfig "$kc" apply -f -
    kubectl --kubeconfig "$kc" wait --for=condition=Established crd --all --timeout=60s
    meshgate install --identity-dir "$work/id" | kubectl --kubeconfig "$kc" apply -f -
    kubectl --kubeconfig "$kc" -n meshgate rollout status deploy --timeout=180s
    meshgate check --kubeconfig "$kc"
done

# 4. Link both ways. The gateway addresses come from each gateway Service; the API
# server address must be the one the other cluster's pods reach: the node's on kind's
# docker network, not the host's port forward the kubeconfig names.
api() { echo "https://$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' \
    "$1-control-plane"):6443"; }
meshgate multicluster link --kubeconfig "$west" --cluster-name west --api-server "$(api west)" \
    | kubectl --kubeconfig "$east" apply -f -
meshgate multicluster link --kubeconfig "$east" --cluster-name east --api-server "$(api east)" \
    | kubectl --kubeconfig "$west" apply -f -
meshgate multicluster check --kubeconfig "$east"

# 5. web in west, exported; an injected client in east calls it as web-west.
kubectl --kubeconfig "$west" create deployment web --image="$image" --port=8080 \
    --dry-run=client -o yaml -- python3 -m http.server 8080 \
    | meshgate inject --kubeconfig "$west" - | kubectl --kubeconfig "$west" apply -f -
kubectl --kubeconfig "$west" expose deployment web --port=80 --target-port=8080 \
    --dry-run=client -o yaml | kubectl --kubeconfig "$west" apply -f -
kubectl --kubeconfig "$west" label service web mirror.meshgate.io/exported=true --overwrite
kubectl --kubeconfig "$west" rollout status deploy/web --timeout=180s
kubectl --kubeconfig "$east" create deployment client --image="$image" --dry-run=client \
    -o yaml -- sleep infinity \
    | meshgate inject --kubeconfig "$east" - | kubectl --kubeconfig "$east" apply -f -
kubectl --kubeconfig "$east" rollout status deploy/client --timeout=180s
kubectl --kubeconfig "$east" exec deploy/client -c client -- python3 -c \
    'import urllib.request as u; print(u.urlopen("http://web-west.default.svc.cluster.local/", timeout=10).status)'
meshgate check --proxy --kubeconfig "$east"
echo "kind-demo: east's client reached west's web through the gateways"

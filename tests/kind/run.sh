#!/usr/bin/env bash
# pilotfish on a real Kubernetes cluster (kind): the control plane of deploy/kubernetes/controlplane
# and the sample app of deploy/kubernetes/standalone, in each injection form, then from inside the
# client pod: a name only the mesh knows resolves through the proxy's DNS, and an HTTP call to
# `hello` arrives over mTLS (hello's proxy adds x-forwarded-client-cert naming the client's
# SPIFFE ID). Exits non-zero with the reason and the relevant logs when a step fails.
#
# Needs: kind, kubectl, a Docker engine, openssl, and the image (`make image` builds pilotfish:dev).
# Settings (environment): KIND_CLUSTER (default pilotfish-kind), IMAGE (pilotfish:dev),
# KIND_NODE_IMAGE (kind's default when empty; native sidecars need Kubernetes >= 1.29),
# FORMS ("classic native-sidecar"), KEEP_CLUSTER=1 to leave the cluster for a look afterwards,
# TIMEOUT (seconds per wait, default 300). docs/kubernetes.md "Testing on kind".
set -euo pipefail

CLUSTER=${KIND_CLUSTER:-pilotfish-kind}
IMAGE=${IMAGE:-pilotfish:dev}
FORMS=${FORMS:-classic native-sidecar}
TIMEOUT=${TIMEOUT:-300}
HERE=$(cd "$(dirname "$0")" && pwd)
DEPLOY=$(cd "$HERE/../../deploy/kubernetes" && pwd)
WORK=$(mktemp -d)
NS=pilotfish-demo

say() { printf 'kind-test: %s\n' "$*" >&2; }
k() { kubectl --context "kind-$CLUSTER" "$@"; }

cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        say "FAILED (status $status); the control plane's and the pods' logs follow"
        k -n istio-system logs deploy/pilotfish-controlplane --tail=60 >&2 || true
        k -n "$NS" get pods -o wide >&2 || true
        for app in hello client; do
            k -n "$NS" logs "deploy/$app" -c istio-proxy --tail=40 >&2 || true
        done
    fi
    if [ -z "${KEEP_CLUSTER:-}" ]; then
        kind delete cluster --name "$CLUSTER" >&2 || true
    else
        say "cluster kept: kubectl --context kind-$CLUSTER ...; kind delete cluster --name $CLUSTER"
    fi
    rm -rf "$WORK"
    exit "$status"
}

for tool in kind kubectl docker openssl; do
    command -v "$tool" >/dev/null || { say "$tool is not installed"; exit 2; }
done
docker image inspect "$IMAGE" >/dev/null 2>&1 || { say "image $IMAGE not found (make image)"; exit 2; }

say "creating cluster $CLUSTER"
kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait "${TIMEOUT}s"
trap cleanup EXIT
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "making the root CA (kept in the Secret pilotfish-ca; published as istio-ca-root-cert)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/O=cluster.local/CN=pilotfish root CA" \
    -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$WORK/root-key.pem" -out "$WORK/root-cert.pem" 2>/dev/null

say "deploying the control plane"
k apply -f "$DEPLOY/controlplane/namespace.yaml"
k -n istio-system create secret generic pilotfish-ca \
    --from-file=root-key.pem="$WORK/root-key.pem" --from-file=root-cert.pem="$WORK/root-cert.pem"
k apply -f "$DEPLOY/controlplane/"
k -n istio-system rollout status deploy/pilotfish-controlplane --timeout="${TIMEOUT}s"

k apply -f "$DEPLOY/standalone/common.yaml"
k -n "$NS" create configmap istio-ca-root-cert --from-file=root-cert.pem="$WORK/root-cert.pem"

# run inside the client's app container (uid 1000: its traffic is captured)
PROBE='
import json, socket, urllib.request
address = socket.gethostbyname("api.partner.mesh")
assert address == "240.240.0.10", f"api.partner.mesh resolved to {address}, not the mesh address 240.240.0.10"
body = json.load(urllib.request.urlopen("http://hello.pilotfish-demo.svc.cluster.local/", timeout=5))
xfcc = body["headers"].get("x-forwarded-client-cert", "")
assert body["server"] == "hello", body
assert "URI=spiffe://cluster.local/ns/pilotfish-demo/sa/client" in xfcc, f"no client SPIFFE ID in XFCC: {body}"
print(f"DNS: api.partner.mesh -> {address}; mTLS: hello saw x-forwarded-client-cert {xfcc}")
'

pod_ip() {
    k -n "$NS" get pods -l "app=$1" --field-selector=status.phase=Running \
        -o jsonpath='{.items[0].status.podIP}'
}

for form in $FORMS; do
    say "form $form: deploying the sample"
    k apply -f "$DEPLOY/standalone/$form.yaml"
    for app in hello client; do
        k -n "$NS" rollout status "deploy/$app" --timeout="${TIMEOUT}s"
    done
    hello_ip=$(pod_ip hello)
    client_ip=$(pod_ip client)
    say "form $form: pods hello $hello_ip, client $client_ip; writing them into the mesh file"
    # the control plane reads pods from its mesh file, not the API server: fill the endpoints in
    sed -e "s/endpoints: \[\] *# \[{addresses: \[HELLO_POD_IP\]/endpoints: [{addresses: [$hello_ip]/" \
        -e "s/endpoints: \[\] *# \[{addresses: \[CLIENT_POD_IP\]/endpoints: [{addresses: [$client_ip]/" \
        "$DEPLOY/controlplane/mesh.yaml" > "$WORK/mesh.yaml"
    grep -q "$hello_ip" "$WORK/mesh.yaml" && grep -q "$client_ip" "$WORK/mesh.yaml" \
        || { say "could not fill the pod IPs into the mesh file"; exit 1; }
    k apply -f "$WORK/mesh.yaml"

    # the ConfigMap reaches the control plane's volume within the kubelet's sync period (about a
    # minute), then the mesh is pushed: poll the end result until the deadline
    say "form $form: waiting for DNS and mTLS from client to hello"
    deadline=$((SECONDS + TIMEOUT))
    until out=$(k -n "$NS" exec deploy/client -c client -- python3 -c "$PROBE" 2>&1); do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "form $form: no DNS/mTLS within ${TIMEOUT}s; last attempt: $out"
            exit 1
        fi
        sleep 3
    done
    say "form $form: $out"
    k delete -f "$DEPLOY/standalone/$form.yaml" --wait=true --timeout="${TIMEOUT}s"
done
say "passed: ${FORMS}"

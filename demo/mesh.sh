#!/usr/bin/env bash
# The main job: a pod's DNS, as the agent serves it. `pilotfish controlplane` reads demo/mesh.yaml
# and pushes each proxy its NameTable over istiod's protocol (TLS, its own root CA);
# `pilotfish agent` (as pod productpage-v1 in namespace bookinfo) answers from it on :15053 and
# forwards the rest to a stand-in kube-dns (dnsmasq). Run with `make demo`; it stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PILOTFISH=${PILOTFISH:-$PWD/.venv/bin/pilotfish}
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/pod"
cp demo/mesh.yaml "$work/mesh.yaml"
printf '10.96.0.1 kubernetes.default.svc.cluster.local\n93.184.215.14 www.example.org\n' > "$work/hosts"
printf 'nameserver 127.0.0.1\nsearch bookinfo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n' > "$work/resolv.conf"

"$DNSMASQ" --no-daemon --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$work/hosts" \
  --local=/cluster.local/ --local=/org/ --local-ttl=30 --listen-address=127.0.0.1 --port=15153 \
  --bind-interfaces --log-facility=- 2>"$work/dnsmasq.log" &
start_controlplane() {
  "$PILOTFISH" controlplane --mesh "$work/mesh.yaml" --listen 127.0.0.1:15012 --state-dir "$work/cp" \
    --root-cert-out "$work/pod/var/run/secrets/istio/root-cert.pem" --dual-stack 2>>"$work/controlplane.log" &
  CP=$!
  wait_log "$work/controlplane.log" "listening on" "$CP"
}
start_agent() {
  (cd "$work/pod" && POD_NAME=productpage-v1 POD_NAMESPACE=bookinfo INSTANCE_IP=10.244.1.5 \
     ISTIO_META_DNS_CAPTURE=true ISTIO_META_CLUSTER_ID=Kubernetes PILOT_DISCOVERY_ADDRESS=localhost:15012 \
     exec "$PILOTFISH" agent proxy sidecar --listen 127.0.0.1:15053 --upstream 127.0.0.1:15153 \
       --resolv-conf "$work/resolv.conf" --status-port 15020) 2>>"$work/agent.log" &
  AGENT=$!
  wait_log "$work/agent.log" "status: listening" "$AGENT"
}
wait_log() {  # wait_log FILE TEXT: wait for TEXT in FILE from the process just started (pid in $3)
  for _ in $(seq 100); do tail -n +"${LOG_FROM[$1]:-1}" "$1" 2>/dev/null | grep -q "$2" && { LOG_FROM[$1]=$(( $(wc -l < "$1") + 1 )); return; }; sleep 0.1; done
  cat "$1"; exit 1
}
declare -A LOG_FROM
ready() { python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:15020/healthz/ready').status)" 2>/dev/null || echo 503; }
ask() {  # ask WHAT DIG-ARGS...
  echo "== $1"; shift
  echo "   \$ dig @127.0.0.1 -p 15053 $*"
  dig @127.0.0.1 -p 15053 +noall +answer +comments "$@" | grep -E "status:|IN" | sed 's/^/   /'
  echo
}

start_controlplane
start_agent
for _ in $(seq 50); do [ "$(ready)" = 200 ] && break; sleep 0.1; done
echo "== the agent is ready ($(ready)): it got its NameTable from the control plane over TLS"
echo
ask "a mesh service by its short name" productpage
ask "what the pod's resolver sends first for ratings.shop (ndots:5): one reply, CNAME + A" ratings.shop.bookinfo.svc.cluster.local
ask "a headless service's pod (StatefulSet)" mysql-0.mysql
ask "a ServiceEntry, through the second search domain (Istio forwards this)" api.partner.example.svc.cluster.local
ask "IPv6" reviews AAAA
ask "not in the mesh: forwarded to kube-dns (and cached)" kubernetes.default.svc.cluster.local

echo "== a new service in the mesh file: pushed and answered"
"$PWD/.venv/bin/python" - "$work/mesh.yaml" <<'PY'
import sys, yaml  # the mesh with one service more, written aside, then renamed over it
path = sys.argv[1]
doc = yaml.safe_load(open(path))
doc["services"].append({"name": "details", "namespace": "bookinfo", "clusterIPs": ["10.96.12.9"], "ports": [9080]})
open(path + ".tmp", "w").write(yaml.safe_dump(doc, sort_keys=False))
PY
start=$(date +%s%N); mv "$work/mesh.yaml.tmp" "$work/mesh.yaml"
until [ "$(dig @127.0.0.1 -p 15053 +short details)" = "10.96.12.9" ]; do sleep 0.02; done
echo "   details -> $(dig @127.0.0.1 -p 15053 +short details), $(( ($(date +%s%N) - start) / 1000000 )) ms after the file changed"
echo

echo "== metrics (http://127.0.0.1:15020/stats/prometheus)"
python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:15020/stats/prometheus').read().decode())" \
  | grep -E "^(istio_agent_dns_[a-z_]+_total|pilotfish_dns_local_answers_total|pilotfish_xds_[a-z_]+|istio_agent_istiod_connection_failures_total) " | sed 's/^/   /'
echo
echo "== the control plane goes away: the agent keeps answering, and stays ready ($(kill $CP; wait $CP 2>/dev/null; sleep 0.3; ready))"
echo "   productpage -> $(dig @127.0.0.1 -p 15053 +short productpage)"
echo "== the agent restarts while the control plane is still away: the saved table answers at once"
kill $AGENT; wait $AGENT 2>/dev/null || true
start_agent
echo "   productpage -> $(dig @127.0.0.1 -p 15053 +short productpage), ready: $(ready)"
echo

echo "== the agent's log"
sed 's/^/   /' "$work/agent.log"
echo "== the control plane's log"
sed 's/^/   /' "$work/controlplane.log"

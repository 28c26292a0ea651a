#!/usr/bin/env bash
# The DNS proxy as a pod in namespace "bookinfo" sees it: pilotfish dns on 127.0.0.1:15053 with
# demo/nametable.json, forwarding what is not in the mesh to a stand-in kube-dns (dnsmasq).
# Run with `make demo`; it stops both servers when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PILOTFISH=${PILOTFISH:-.venv/bin/pilotfish}
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

cat > "$work/hosts" <<'HOSTS'
10.96.0.1 kubernetes.default.svc.cluster.local
93.184.215.14 www.example.org
HOSTS
cat > "$work/resolv.conf" <<'RESOLV'
nameserver 127.0.0.1
search bookinfo.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
RESOLV
"$DNSMASQ" --no-daemon --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$work/hosts" \
  --local=/cluster.local/ --local=/org/ --local-ttl=30 --listen-address=127.0.0.1 --port=15153 \
  --bind-interfaces --log-facility=- 2>"$work/dnsmasq.log" &
"$PILOTFISH" dns --name-table demo/nametable.json --resolv-conf "$work/resolv.conf" \
  --upstream 127.0.0.1:15153 --listen 127.0.0.1:15053 --proxy-namespace bookinfo \
  --metrics-addr 127.0.0.1:15054 2>"$work/pilotfish.log" &
for _ in $(seq 50); do grep -q "listening tcp" "$work/pilotfish.log" && break; sleep 0.1; done
if ! grep -q "listening tcp" "$work/pilotfish.log"; then cat "$work/pilotfish.log"; exit 1; fi

ask() {  # ask WHAT DIG-ARGS...: show the question and the answer section
  echo "== $1"; shift
  echo "   \$ dig @127.0.0.1 -p 15053 $*"
  dig @127.0.0.1 -p 15053 +noall +answer +comments "$@" | grep -E "status:|flags:|IN" | sed 's/^/   /'
  echo
}
ask "a mesh service by its short name (same namespace)" productpage
ask "another namespace, name.namespace" ratings.shop
ask "what the pod's resolver really sends first (ndots:5): one reply, CNAME + A" ratings.shop.bookinfo.svc.cluster.local
ask "an external ServiceEntry host through the second search domain (Istio forwards this)" api.partner.example.svc.cluster.local
ask "a wildcard ServiceEntry" x.cdn.partner.example
echo "== its records rotate from reply to reply (round robin)"
for _ in 1 2 3; do echo "   $(dig @127.0.0.1 -p 15053 +short y.cdn.partner.example | tr '\n' ' ')"; done
echo
ask "IPv6" reviews AAAA
ask "not in the mesh: forwarded to kube-dns" kubernetes.default.svc.cluster.local
sleep 2
ask "two seconds later: from pilotfish's cache, TTL counting down, AA cleared" kubernetes.default.svc.cluster.local
ask "over TCP" +tcp reviews.bookinfo
echo "== metrics (http://127.0.0.1:15054/metrics)"
curl -s http://127.0.0.1:15054/metrics 2>/dev/null | grep -E "^(istio_agent_dns_[a-z_]+_total|pilotfish_dns_[a-z_]+) " | sed 's/^/   /' \
  || python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15054/metrics').read().decode())" | grep -E "^(istio_agent_dns_[a-z_]+_total|pilotfish_dns_[a-z_]+) "
echo
echo "== pilotfish's log"
sed 's/^/   /' "$work/pilotfish.log"

#!/usr/bin/env bash
# The CNI plugin alone, on one machine: a "node" network namespace, three pods wired by the real
# `mistnet` CNI plugin (called exactly as a container runtime calls it), traffic between them,
# CHECK catching drift, and a clean teardown. Installs and builds what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: creates network namespaces and needs root: run 'sudo scripts/demo.sh'" >&2
  exit 1
fi
bash scripts/setup.sh
echo "== building mistnet (release, static)"
out=$(bash scripts/build.sh -q | tail -1)
BIN="$PWD/$out/mistnet"

tag="demo$$"
node="$tag-node"
work=$(mktemp -d)
pods=()
cleanup() {
  for p in "${pods[@]}"; do ip netns del "$p" 2>/dev/null || true; done
  ip netns del "$node" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cat > "$work/node.json" <<JSON
{"version": 1, "nodeName": "demo-node", "podCidrs": ["10.244.1.0/24", "fd00:10:244:1::/80"], "mtu": 1420}
JSON
conf() {
  printf '{"cniVersion":"%s","name":"mistnet","type":"mistnet","nodeStateFile":"%s","dataDir":"%s"%s}' \
    "${2:-1.1.0}" "$work/node.json" "$work/data" "${1:-}"
}
cni() { # cni VERB CONTAINER [extra-json] [version]
  local pod="$tag-$2"
  conf "${3:-}" "${4:-1.1.0}" | ip netns exec "$node" env CNI_COMMAND="$1" CNI_CONTAINERID="$2" \
    CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni "$BIN"
}

step "A node (namespace $node) whose node state says: pod CIDRs 10.244.1.0/24 + fd00:10:244:1::/80, MTU 1420"
ip netns add "$node"
ip netns exec "$node" ip link set lo up
ip netns exec "$node" ip addr add 192.0.2.1/32 dev lo
conf "" | ip netns exec "$node" env CNI_COMMAND=STATUS "$BIN" && echo "STATUS: plugin available"

step "ADD three pods, as the runtime would (timed)"
declare -A ip4 ip6
for c in web db cache; do
  pods+=("$tag-$c")
  ip netns add "$tag-$c"
  start=$(date +%s%N)
  res=$(cni ADD "$c")
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  ip4[$c]=$(jq -r '.ips[0].address' <<<"$res" | cut -d/ -f1)
  ip6[$c]=$(jq -r '.ips[1].address' <<<"$res" | cut -d/ -f1)
  printf '  %-6s -> %-12s %-22s host veth %s  (%d ms)\n' "$c" "${ip4[$c]}" "${ip6[$c]}" \
    "$(jq -r '.interfaces[0].name' <<<"$res")" "$ms"
done

step "Inside pod 'web': eth0 and its routes (gateway 169.254.1.1 / fe80::1, answered by the host)"
ip netns exec "$tag-web" ip -br addr show dev eth0
ip netns exec "$tag-web" ip route
ip netns exec "$tag-web" ip -6 route show default

step "Pod to pod (IPv4 and IPv6) and pod to host"
ip netns exec "$tag-web" ping -c 2 -i 0.2 -W 2 "${ip4[db]}" | tail -2
ip netns exec "$tag-web" ping -6 -c 2 -i 0.2 -W 2 "${ip6[cache]}" | tail -2
ip netns exec "$tag-db" ping -c 2 -i 0.2 -W 2 192.0.2.1 | tail -2

step "CHECK notices drift: remove the default route inside 'db'"
prev=$(cni ADD web 2>/dev/null || true)
echo "  (a second ADD of the same attachment is refused: $(jq -c '{code,msg}' <<<"$prev"))"
ip netns exec "$tag-db" ip route del default
res_db=$(jq -n --arg a "${ip4[db]}/32" --arg b "${ip6[db]}/128" --arg s "/var/run/netns/$tag-db" \
  '{interfaces:[{name:"x"},{name:"eth0",sandbox:$s}],ips:[{address:$a,interface:1},{address:$b,interface:1}]}')
cni CHECK db ",\"prevResult\":$res_db" | jq -c '{code,msg,details}' || true

step "DEL every pod; the node is left clean"
for c in web db cache; do cni DEL "$c"; done
echo "  veths left: $(ip netns exec "$node" ip -o link | grep -c mist || true)"
echo "  allocations left: $(cat "$work"/data/ipam/mistnet/state-*.json | jq '.allocations | length')"

step "ADD/DEL latency against the reference bridge + host-local (30 iterations each)"
"$PWD/$out/cni-latency" --iterations 30 --mistnet "$BIN"

step "done: everything the demo created has been removed"

#!/usr/bin/env bash
# Installs everything mistnet needs to build and test on a fresh Debian machine.
# Idempotent: packages already present are left alone. Needs root (or sudo).
set -euo pipefail

packages=(
  clang llvm libbpf-dev bpftool          # eBPF programs
  iproute2 iptables nftables iputils-ping procps psmisc  # namespaces, routes, ping
  containernetworking-plugins            # reference CNI plugins (chain + benchmark)
  iperf3 irtt sockperf                   # reference link measurement tools
  wireguard-go wireguard-tools           # WireGuard interop + reference overlay
  tcpdump jq hyperfine ethtool
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install packages" >&2; exit 1; }
  sudo_cmd=(sudo)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust 1.95+ with rustup" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "setup: ok"

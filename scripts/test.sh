#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests and the root network-namespace
# integration tests. Installs what it needs first. Fails loudly when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test: the integration tests create network namespaces and need root: run 'sudo scripts/test.sh'" >&2
  exit 1
fi
bash scripts/setup.sh

missing=()
for tool in ip tc iptables-save ping iperf3 irtt wireguard-go wg tcpdump; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
for plugin in bridge host-local portmap bandwidth; do
  [ -x "/usr/lib/cni/$plugin" ] || missing+=("/usr/lib/cni/$plugin")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: missing after setup: ${missing[*]}" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (unit + root netns integration)"
cargo test --workspace --locked -- --test-threads="${MISTNET_TEST_THREADS:-2}"
echo "== all tests passed"

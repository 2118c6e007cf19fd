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
echo "== cargo build (binaries the lab and integration tests run)"
cargo build --workspace --bins --locked
echo "== cargo test (unit + root netns integration)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked -- --test-threads="${MISTNET_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# WireGuard's timers (keepalive, rekey, expiry) driven through boringtun's mock clock: a
# separate run, so the mock clock never reaches a daemon build.
if [ "$status" -eq 0 ]; then
  cargo test --locked -p mistnet-overlay --features mock-clock -- --test-threads=1 timers 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
# The heavy simulations, optimised: thousands of seeded path-selection runs (failover bound,
# probe budget) and the 1000-node control-channel convergence (ignored in debug builds).
if [ "$status" -eq 0 ]; then
  MISTNET_SIM_RUNS="${MISTNET_SIM_RUNS:-10000}" cargo test --release --locked -p mistnet-path -p mistnet-sync 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

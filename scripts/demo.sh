#!/usr/bin/env bash
# The README's first command: installs what it needs, builds, and runs `mistlab demo`, a
# narrated 3-node edge cluster on this machine (real daemons, real pods, an emulated WAN that
# degrades and breaks). Everything it creates is removed on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: creates network namespaces and needs root: run 'sudo scripts/demo.sh'" >&2
  exit 1
fi
bash scripts/setup.sh
echo "== building mistnet, mistnetd, netbench and mistlab (release)"
cargo build --release --locked -q -p mistnet-cni -p mistnet-agent -p netbench -p mistlab
exec target/release/mistlab --name demo demo

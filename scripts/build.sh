#!/usr/bin/env bash
# Builds the release binaries. The CNI plugin is linked statically (glibc crt-static), as CNI
# plugins are copied onto hosts whose libc we do not control, and because skipping the dynamic
# loader is a quarter of the plugin's ADD latency. `--target` is explicit so that the static
# flag applies to the shipped binaries only, not to build scripts and proc-macros.
# Output: target/<host-triple>/release/{mistnet,mistnetd,cni-latency,overlay-bench}
set -euo pipefail
cd "$(dirname "$0")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$triple" -p mistnet-cni -p mistnet-agent -p mistnet-bench "$@"
echo "target/$triple/release"

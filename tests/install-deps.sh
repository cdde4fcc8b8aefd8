#!/usr/bin/env bash
# Installs the real components the end-to-end tests drive (Debian packages): the CNCF
# distribution registry as upstream, containerd + ctr, skopeo and podman (pulling through
# registries.conf mirrors, as CRI-O does) as clients, curl as a TLS client for intercept
# and TLS-registry checks and as the client inside network namespaces, and iproute2 for
# those namespaces. A podman pull runs no container: it needs the package's own
# dependencies only, none of its recommends.
set -euo pipefail
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v containerd >/dev/null && command -v ctr >/dev/null || need+=(containerd)
command -v skopeo >/dev/null || need+=(skopeo)
command -v podman >/dev/null || need+=(podman)
command -v curl >/dev/null || need+=(curl ca-certificates)
# A real DNS server for the cluster discovery test.
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
# Several nodes on one machine (tests/support/cluster.rs): network namespaces, veth, a
# bridge and tc tbf.
command -v ip >/dev/null && command -v tc >/dev/null || need+=(iproute2)
# protoc: the CRI client's bindings (dev-dependency k8s-cri) are generated at build time.
command -v protoc >/dev/null || need+=(protobuf-compiler)
# libFuzzer, built by the fuzz targets, is C++.
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test dependencies: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The containerd matrix: 1.7 (trixie) and 2.1 (sid) beside the system's 1.6, downloaded and
# extracted under target/containerd/ (not installed).
"$(dirname "$0")/fetch-containerd.sh"

# Lazy pulls: soci-snapshotter (sid), extracted under target/soci/ (not installed). It mounts
# its layers with FUSE: the kernel's /dev/fuse, as root, no fusermount needed.
"$(dirname "$0")/fetch-soci.sh"

# The chart test's alerts: promtool (trixie), extracted under target/promtool/ (not installed).
"$(dirname "$0")/fetch-promtool.sh"

# The chart test: the real Helm engine (helm-python-sdk) and Kubernetes schemas.
if ! python3 -c "import helm_python, kubernetes_validate, yaml" 2>/dev/null; then
  echo "installing chart test dependencies"
  python3 -m pip install --quiet --disable-pip-version-check -r "$(dirname "$0")/chart/requirements.txt"
fi

# The fuzz targets: cargo-fuzz, at the version the Makefile was written against.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

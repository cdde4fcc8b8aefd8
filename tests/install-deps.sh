#!/usr/bin/env bash
# Installs the real components the end-to-end tests drive (Debian packages): the CNCF
# distribution registry as upstream, containerd + ctr and skopeo as clients, and curl as a
# TLS client for intercept and TLS-registry checks.
set -euo pipefail
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v containerd >/dev/null && command -v ctr >/dev/null || need+=(containerd)
command -v skopeo >/dev/null || need+=(skopeo)
command -v curl >/dev/null || need+=(curl ca-certificates)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing test dependencies: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"

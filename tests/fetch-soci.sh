#!/usr/bin/env bash
# soci-snapshotter (Debian sid, 0.4.1) for the lazy-pull tests (tests/e2e/lazy_pulls.rs):
# downloaded with apt from a private sources list and state directory, and extracted (dpkg -x,
# not installed) under DEST/, as tests/fetch-containerd.sh does for containerd. Static Go
# binaries: they need only the C library.
#
#   tests/fetch-soci.sh [DEST]      # default: target/soci
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/target/soci}"

[ -x "$dest/usr/bin/soci-snapshotter-grpc" ] && [ -x "$dest/usr/bin/soci" ] && exit 0

apt_dir="$dest/.apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
  > "$apt_dir/etc/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
  -o "Dir::Etc::SourceParts=/nonexistent"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "Debug::NoLocking=1"
  -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=root"
)
echo "fetching soci-snapshotter from Debian sid"
apt-get "${apt_opts[@]}" update -qq
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get "${apt_opts[@]}" download -qq soci-snapshotter/sid)
rm -rf "$dest/usr"
dpkg -x "$work"/soci-snapshotter_*.deb "$dest"
"$dest/usr/bin/soci-snapshotter-grpc" -version
"$dest/usr/bin/soci" --version

#!/usr/bin/env bash
# containerd 1.7 (Debian trixie) and 2.1 (sid) for the end-to-end matrix, beside the system's
# 1.6 (bookworm): each package is downloaded with apt from a private sources list and state
# directory, and extracted (dpkg -x, not installed) under DEST/<suite>/, so the system's
# packages stay as they are. Go binaries: they run on this machine's older C library.
#
#   tests/fetch-containerd.sh [DEST]      # default: target/containerd
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/target/containerd}"
suites=(trixie sid)

missing=()
for suite in "${suites[@]}"; do
  [ -x "$dest/$suite/usr/bin/containerd" ] || missing+=("$suite")
done
[ ${#missing[@]} -eq 0 ] && exit 0

apt_dir="$dest/.apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc"
: > "$apt_dir/etc/sources.list"
for suite in "${suites[@]}"; do
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    >> "$apt_dir/etc/sources.list"
done
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
echo "fetching containerd from Debian ${missing[*]}"
apt-get "${apt_opts[@]}" update -qq
for suite in "${missing[@]}"; do
  work="$(mktemp -d)"
  (cd "$work" && apt-get "${apt_opts[@]}" download -qq "containerd/$suite")
  rm -rf "$dest/$suite"
  dpkg -x "$work"/containerd_*.deb "$dest/$suite"
  rm -rf "$work"
  "$dest/$suite/usr/bin/containerd" --version
done

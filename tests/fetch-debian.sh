#!/usr/bin/env bash
# One package from a newer Debian suite, for the tests, without touching the system's
# packages: downloaded with apt from a private sources list and state directory (under
# target/debian-apt) and extracted (dpkg -x, not installed) into DEST. The callers check
# first whether DEST already has what they need.
#
#   tests/fetch-debian.sh SUITE PACKAGE DEST
set -euo pipefail
suite="$1" package="$2" dest="$3"
root="$(cd "$(dirname "$0")/.." && pwd)"
apt_dir="$root/target/debian-apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc"
: > "$apt_dir/etc/sources.list"
for s in trixie sid; do
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $s main" \
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
echo "fetching $package from Debian $suite"
# The lists once an hour at most: several packages in one install share them.
if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | head -1)" ]; then
  apt-get "${apt_opts[@]}" update -qq
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get "${apt_opts[@]}" download -qq "$package/$suite")
rm -rf "$dest"
mkdir -p "$dest"
dpkg -x "$work/${package}"_*.deb "$dest"

#!/usr/bin/env bash
# soci-snapshotter (Debian sid, 0.4.1) for the lazy-pull tests (tests/e2e/lazy_pulls.rs),
# extracted under DEST/ by tests/fetch-debian.sh (not installed). Static Go binaries: they need
# only the C library.
#
#   tests/fetch-soci.sh [DEST]      # default: target/soci
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../target/soci}"
[ -x "$dest/usr/bin/soci-snapshotter-grpc" ] && [ -x "$dest/usr/bin/soci" ] && exit 0
"$here/fetch-debian.sh" sid soci-snapshotter "$dest"
"$dest/usr/bin/soci-snapshotter-grpc" -version
"$dest/usr/bin/soci" --version

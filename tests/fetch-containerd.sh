#!/usr/bin/env bash
# containerd 1.7 (Debian trixie) and 2.1 (sid) for the end-to-end matrix, beside the system's
# 1.6 (bookworm), extracted under DEST/<suite>/ by tests/fetch-debian.sh (not installed: the
# system's packages stay as they are). Go binaries: they run on this machine's C library.
#
#   tests/fetch-containerd.sh [DEST]      # default: target/containerd
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../target/containerd}"
for suite in trixie sid; do
  [ -x "$dest/$suite/usr/bin/containerd" ] && continue
  "$here/fetch-debian.sh" "$suite" containerd "$dest/$suite"
  "$dest/$suite/usr/bin/containerd" --version
done

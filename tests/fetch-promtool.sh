#!/usr/bin/env bash
# promtool (Debian trixie's promtool package; bookworm has it only inside the prometheus
# server's) for the chart test, which checks the PrometheusRule's alerts with `promtool check
# rules` and `promtool test rules`. Extracted under DEST/ by tests/fetch-debian.sh (not
# installed). A Go binary: it needs only the C library.
#
#   tests/fetch-promtool.sh [DEST]      # default: target/promtool
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../target/promtool}"
[ -x "$dest/usr/bin/promtool" ] && exit 0
"$here/fetch-debian.sh" trixie promtool "$dest"
"$dest/usr/bin/promtool" --version

#!/usr/bin/env bash
# Local training corpora from Debian: Python's reStructuredText docs and the KJV bible text.
set -euo pipefail
pkgs="python3.11-doc bible-kjv-text bible-kjv"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing corpora:$missing"
$SUDO apt-get install -y -q $missing >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }

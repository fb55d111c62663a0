#!/usr/bin/env bash
# Makes sure headless Chromium is installed for the report rendering test
# (tests/pipelines/outputs/test_report.py). Installs Debian's `chromium` package when it is missing and this
# runs as root; otherwise prints what to do and exits non-zero. Safe to call repeatedly.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "ensure_chromium: found $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_chromium: 'chromium' is not installed and this shell is not root, so it cannot be installed here." >&2
    echo "  Install it with: sudo apt-get update && sudo apt-get install -y chromium" >&2
    echo "  (without it the report rendering test is skipped)." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get on this machine; install Chromium so that 'chromium' is on PATH" >&2
    exit 1
fi
echo "ensure_chromium: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium
command -v chromium >/dev/null 2>&1 || { echo "ensure_chromium: install finished but 'chromium' is not on PATH" >&2; exit 1; }
echo "ensure_chromium: installed $(command -v chromium)"

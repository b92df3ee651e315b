#!/usr/bin/env bash
# Installs what the browser tests need: Debian's chromium (no browser download by a test tool) and playwright-core.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2
  fi
fi
if command -v npm >/dev/null; then
  (cd browser && npm install --no-audit --no-fund --silent)
fi

#!/usr/bin/env bash
# The browser tests (pytest -m browser, deselected by `make test`): the leaderboard page in
# real headless Chromium, Debian's `chromium` + `chromium-driver`, driven by selenium through
# the system chromedriver (nothing is downloaded at test time). Installs the two packages
# when either command is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "ci_browser: installing chromium and chromium-driver"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi
[ -x "$VENV/bin/python" ] || make install VENV="$VENV"
# This -m replaces the default one in pyproject's addopts (the last -m wins).
"$VENV/bin/python" -m pytest -q -m browser tests/browser

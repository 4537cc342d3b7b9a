#!/usr/bin/env bash
# Installs what tests/test_app_browser.py needs: Debian's Chromium (run headless) and the Playwright Python package
# that drives it, plus fonts so that screenshots show text and emoji. Idempotent: what is present is skipped.
# Never runs `playwright install` (that downloads browser builds); the test points Playwright at /usr/bin/chromium.
set -euo pipefail

PLAYWRIGHT_VERSION="1.65.2"
APT_PACKAGES=(chromium fonts-liberation fonts-noto-color-emoji)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ -x /usr/bin/chromium ] && [ "${#missing[@]}" -eq 0 ]; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
fi

if python -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '${PLAYWRIGHT_VERSION}')" 2>/dev/null; then
    echo "playwright: ${PLAYWRIGHT_VERSION} already installed"
else
    python -m pip install "playwright==${PLAYWRIGHT_VERSION}"
fi

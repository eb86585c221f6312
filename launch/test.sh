#!/usr/bin/env bash
# Install medjax with its test extras and run the test suite. pytest's exit code is the
# script's: a failure, or no test collected (exit 5), fails.
# The web page's end-to-end test drives headless Chromium: Debian's chromium and
# chromium-driver are installed here when missing and apt-get can (as root); the test then
# fails rather than skips without them (MEDJAX_REQUIRE_BROWSER=0 lets it skip).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e ".[test]"
have_browser() {
  command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }
}
if ! have_browser && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Installing chromium and chromium-driver (Debian packages) for the browser test"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "Could not install chromium; the browser test will fail."
fi
export MEDJAX_REQUIRE_BROWSER="${MEDJAX_REQUIRE_BROWSER:-1}"
python -m pytest tests -q "$@"

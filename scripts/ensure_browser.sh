#!/usr/bin/env bash
# Test set-up: the report's browser check (scripts/check_report_html.py) needs Chromium. Where none is installed
# and this user may install Debian packages (root, or password-less sudo), install Debian's `chromium`.
# Never fails the set-up itself: the test that needs the browser fails (when CI is set) or says why it skipped.
set -uo pipefail
for name in chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "capsafe: no Chromium and no apt-get; install Chromium to run the report's browser check" >&2; exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "capsafe: no Chromium and no right to install it (apt-get install chromium needs root)" >&2; exit 0
fi
echo "capsafe: installing Chromium for the report's browser check (apt-get install chromium, ~20 s)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
  || echo "capsafe: apt-get install chromium failed; the browser check cannot run" >&2
exit 0

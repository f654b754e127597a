#!/usr/bin/env bash
# Make sure the headless browser of tests/test_human_eval.py is here: Debian's chromium and
# chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver).
#
# Why: the human-eval rating page is tested in a real browser, and CI runs `make test` on a fresh
# machine where nothing installed by hand survives. As root with apt-get, this installs both
# packages (one quiet `apt-get update`, then the install: about 15 s); otherwise it prints how to.
# It never fails `make test` itself: without the browser the test skips saying how to install it,
# or fails when CI=true, so a missing browser is reported where it matters.
set -uo pipefail

have() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
packages=(chromium chromium-driver)

have && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: installing chromium + chromium-driver for tests/test_human_eval.py ..."
    log="$(mktemp)"
    start=$SECONDS
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >>"$log" 2>&1 && have; then
        echo "ensure-browser: done in $((SECONDS - start)) s"
    else
        echo "ensure-browser: the install failed (last lines of apt-get below); the browser test will" \
            "skip, or fail under CI=true" >&2
        tail -n 15 "$log" >&2
    fi
    rm -f "$log"
else
    echo "ensure-browser: chromium/chromium-driver are missing and this is not root with apt-get;" \
        "install them with: sudo apt-get install --no-install-recommends ${packages[*]}" >&2
fi
exit 0

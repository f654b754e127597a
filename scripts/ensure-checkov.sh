#!/usr/bin/env bash
# Make sure checkov, the Kubernetes manifest scanner of tests/k8s/test_checkov.py, is here: the pinned
# version below in its own virtualenv, .venv-checkov/ (gitignored; CHECKOV_VENV overrides the path).
#
# Why its own: checkov's dependencies would downgrade packages the project pins (boto3, botocore,
# packaging, cachetools, networkx; see constraints.txt), so it never goes into .venv. CI runs
# `make test` on a fresh clone, where nothing installed by hand survives: this installs it there
# (quiet uv in seconds, or pip in about 40 s, longer on a machine that downloads it all).
# It never fails `make test` itself: without checkov the scan test skips saying how to install it,
# or fails when CI=true, so a missing scanner is reported where it matters.
set -uo pipefail

CHECKOV_VERSION=3.3.30
cd "$(dirname "$0")/.."
venv="${CHECKOV_VENV:-.venv-checkov}"
python="${PYTHON:-python3}"

# The stamp is written last, once pip succeeded: an interrupted install is not taken for one.
stamp="$venv/.checkov-$CHECKOV_VERSION"
installed() { [ -f "$stamp" ] && [ -x "$venv/bin/checkov" ]; }

installed && exit 0

echo "ensure-checkov: installing checkov==$CHECKOV_VERSION into $venv for tests/k8s/test_checkov.py ..."
if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "ensure-checkov: $venv exists and is not a virtualenv; leaving it alone" >&2
    exit 0
fi
log="$(mktemp)"
start=$SECONDS
rm -rf "$venv"
# uv (UV=path, as make test passes; else one on PATH) takes seconds where pip takes about 40 s;
# pip is the fallback wherever uv is missing or can't reach the index.
uv="${UV:-$(command -v uv || true)}"
install_checkov() {
    if [ -n "$uv" ] && [ -x "$uv" ] &&
        "$uv" pip install -q --python "$venv/bin/python" "checkov==$CHECKOV_VERSION" >>"$log" 2>&1; then
        return 0
    fi
    "$venv/bin/python" -m pip install -q --no-compile "checkov==$CHECKOV_VERSION" >>"$log" 2>&1
}
if "$python" -m venv "$venv" >"$log" 2>&1 && install_checkov; then
    touch "$stamp"
fi
if installed; then
    echo "ensure-checkov: done in $((SECONDS - start)) s"
else
    echo "ensure-checkov: the install failed (last lines of pip below); the checkov test will skip," \
        "or fail under CI=true" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 15 >&2
fi
rm -f "$log"
exit 0

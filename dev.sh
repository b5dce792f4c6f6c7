#!/usr/bin/env bash
# Set crossint up on a fresh machine (Python + pip) and run one job:
#   bash dev.sh demo [DIR]   install, then run the end-to-end demo on the embedded story model
#   bash dev.sh test         install (with Chromium for the report test), then run the tests
#   bash dev.sh setup        install only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
    # A bare `torch` requirement on a machine without torch pulls the newest CUDA build (GBs);
    # install the pinned CPU-friendly release first, but never replace a torch the user already has.
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet "torch==2.13.0"
    fi
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
}

browser() {
    # The report test renders in headless Chromium; install Debian's package when it is missing.
    command -v chromium >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: the browser test will be skipped" >&2; return 0; }
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 \
             && $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
        || echo "could not install chromium: the browser test will be skipped" >&2
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; "$PYTHON" -m crossint demo --out "${2:-runs/demo}" ;;
    test) setup; browser; shift; "$PYTHON" -m pytest -q "$@" ;;
    *) echo "usage: bash dev.sh demo [DIR] | test [PYTEST ARGS] | setup" >&2; exit 2 ;;
esac

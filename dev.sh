#!/usr/bin/env bash
# Set crossint up on a fresh machine (Python + pip) and run one job:
#   bash dev.sh demo [DIR]   install, then run the end-to-end demo on the embedded story model
#   bash dev.sh test         install (with Chromium for the report test), then run the tests
#   bash dev.sh setup        install only
#
# Where it installs: inside a virtual (or conda) environment, into that environment; otherwise
# into a project environment .venv/ that it creates (a Debian/Ubuntu system Python refuses
# pip installs, PEP 668). The .venv sees the machine's packages (--system-site-packages), so a
# torch already installed is used, not downloaded again. PYTHON=/path/to/python overrides.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PYTHON=${PYTHON:-}

in_environment() {
    # Is interpreter $1 running inside a virtual environment (or an activated conda env)?
    "$1" -c 'import os, sys
conda = os.environ.get("CONDA_DEFAULT_ENV", "base") != "base"
sys.exit(0 if sys.prefix != sys.base_prefix or conda else 1)' >/dev/null 2>&1
}

make_venv() {
    # Create $VENV from interpreter $1, with pip when the Python has ensurepip (Debian ships it
    # apart, in python3-venv), else without pip and using the system's pip module inside it.
    local base=$1
    echo "dev.sh: $base is not in a virtual environment: installing into $VENV/" >&2
    if "$base" -m venv --clear --system-site-packages "$VENV" >/dev/null 2>&1; then
        return 0
    fi
    if "$base" -m venv --clear --system-site-packages --without-pip "$VENV" >/dev/null 2>&1 \
            && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    rm -rf "$VENV"
    echo "dev.sh: could not create $VENV with $base: install the venv module" \
         "(Debian/Ubuntu: sudo apt-get install python3-venv) or run inside a virtual environment" >&2
    exit 1
}

choose_python() {
    [ -n "$PYTHON" ] && return 0  # the user's choice
    local base=python3
    command -v python3 >/dev/null 2>&1 || base=python
    if in_environment "$base"; then
        PYTHON=$base
        return 0
    fi
    if ! "$VENV/bin/python" -c "" >/dev/null 2>&1; then
        make_venv "$base"
        echo "dev.sh: to use crossint from your shell afterwards: source $VENV/bin/activate" >&2
    fi
    PYTHON=$VENV/bin/python
}

setup() {
    choose_python
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

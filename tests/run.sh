#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine and run them.
#   bash tests/run.sh [pytest args]
# As root, deploy/slurm-single-node.sh installs (apt-get) and starts a single-node SLURM for
# the SLURM tests; Python packages go into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  eval "$(bash deploy/slurm-single-node.sh)"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine and run them.
#   bash tests/run.sh [pytest args]
# System packages (SLURM, Chromium) are installed with apt-get when running as root;
# a single-node SLURM is started (deploy/slurm-single-node.sh); Python packages go into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v sbatch >/dev/null || need+=(slurmctld slurmd slurm-client munge)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
if [ -x deploy/slurm-single-node.sh ] || [ -f deploy/slurm-single-node.sh ]; then
  if [ "$(id -u)" = "0" ]; then
    bash deploy/slurm-single-node.sh
  fi
fi
if [ -f /etc/slurm/slurm.conf ]; then export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}; fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"

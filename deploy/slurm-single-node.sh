#!/usr/bin/env bash
# Install and start a single-node SLURM (slurmctld + slurmd + munge) on this machine.
#
# For development, CI and small workstations: one node called "localhost" (address 127.0.0.1)
# with this machine's CPUs and memory, one partition, no accounting database.
# Idempotent: run it again and it only starts what is not running.
#
# Usage (as root, Debian/Ubuntu):
#     deploy/slurm-single-node.sh            # install, configure, start, wait until idle
#     eval "$(deploy/slurm-single-node.sh --print-env)"   # just the environment line
#     deploy/slurm-single-node.sh --stop     # stop the daemons this script started
#
# Environment (all optional):
#     TOMODASK_SLURM_CONF_DIR   where slurm.conf is written     (default /etc/slurm)
#     TOMODASK_SLURM_PARTITION  partition name                  (default debug)
#     TOMODASK_SLURM_STATE_DIR  slurmctld/slurmd state and logs (default /var/lib/tomodask-slurm)
#     TOMODASK_SLURM_MEM_RESERVE_MB  memory kept back for the OS (default 5% of RAM, >= 512)
#     TOMODASK_SLURM_SKIP_INSTALL=1  do not call apt-get (packages must be present)
#
# At the end it prints the line users and CI need:
#     export SLURM_CONF=/etc/slurm/slurm.conf
set -euo pipefail

CONF_DIR=${TOMODASK_SLURM_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
PARTITION=${TOMODASK_SLURM_PARTITION:-debug}
STATE_DIR=${TOMODASK_SLURM_STATE_DIR:-/var/lib/tomodask-slurm}
NODE=localhost

log() { echo "[slurm-single-node] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
trap 'log "ERROR: command failed at line $LINENO: $BASH_COMMAND"' ERR

env_line() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
    --print-env) env_line; exit 0 ;;
    --stop)
        for d in slurmd slurmctld; do
            if [[ -f $STATE_DIR/$d.pid ]] && kill -0 "$(cat "$STATE_DIR/$d.pid")" 2>/dev/null; then
                log "stopping $d (pid $(cat "$STATE_DIR/$d.pid"))"
                kill "$(cat "$STATE_DIR/$d.pid")"
            fi
        done
        exit 0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    "") ;;
    *) die "unknown option $1 (accepted: --print-env, --stop, --help)" ;;
esac

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts system daemons)"

# ---- 1. packages -------------------------------------------------------------------
need_install=0
for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || need_install=1
done
if [[ $need_install -eq 1 ]]; then
    [[ ${TOMODASK_SLURM_SKIP_INSTALL:-0} == 1 ]] && die "SLURM packages missing and TOMODASK_SLURM_SKIP_INSTALL=1"
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client and munge with your package manager"
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
export PATH=$PATH:/usr/sbin

# ---- 2. munge ------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start; see /var/log/munge/munged.log"
fi

# ---- 3. slurm.conf -------------------------------------------------------------------
cpus=$(nproc --all)
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
reserve_mb=${TOMODASK_SLURM_MEM_RESERVE_MB:-$(( mem_total_mb / 20 > 512 ? mem_total_mb / 20 : 512 ))}
real_mem_mb=$(( mem_total_mb - reserve_mb ))
slurm_user=root
mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$STATE_DIR/log"

new_conf=$(cat <<EOF
# Written by tomodask deploy/slurm-single-node.sh: a single-node SLURM for development and CI.
ClusterName=tomodask
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$slurm_user
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=60
Waittime=0
DefMemPerCPU=1024
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    [[ -f $CONF ]] && cp "$CONF" "$CONF.bak.$(date +%s)" && log "previous $CONF saved as $CONF.bak.*"
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
    log "wrote $CONF (CPUs=$cpus RealMemory=${real_mem_mb}MB partition=$PARTITION)"
fi
# SLURM >= 23.11 reads cgroup.conf even with proctrack/linuxproc; "disabled" keeps it out of the
# way in containers. 22.05 (Debian 12) does not know "disabled" and needs no cgroup.conf at all.
slurm_version=$(sinfo --version | awk '{print $2}')
if [[ ! -f $CONF_DIR/cgroup.conf ]] && printf '%s\n23.11\n' "$slurm_version" | sort -V -C -r 2>/dev/null; then
    echo "CgroupPlugin=disabled" > "$CONF_DIR/cgroup.conf"
    log "wrote $CONF_DIR/cgroup.conf (CgroupPlugin=disabled) for SLURM $slurm_version"
fi
export SLURM_CONF=$CONF

# ---- 4. daemons ----------------------------------------------------------------------
running() { [[ -f $STATE_DIR/$1.pid ]] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null; }

if running slurmctld; then
    if [[ $conf_changed -eq 1 ]]; then log "slurm.conf changed: scontrol reconfigure"; scontrol reconfigure >&2 || true; fi
    log "slurmctld already running (pid $(cat "$STATE_DIR/slurmctld.pid"))"
else
    log "starting slurmctld"
    slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld is not answering; see $STATE_DIR/log/slurmctld.log"

if running slurmd; then
    log "slurmd already running (pid $(cat "$STATE_DIR/slurmd.pid"))"
else
    log "starting slurmd -N $NODE"
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $STATE_DIR/log/slurmd.log"
fi

# ---- 5. wait until the node takes jobs -------------------------------------------------
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case $state in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE is '$state' (reason: $(sinfo -h -n "$NODE" -o '%E')); see $STATE_DIR/log/slurmd.log" ;;
esac
log "SLURM is up: node $NODE ($state), partition $PARTITION, $cpus CPUs, ${real_mem_mb}MB"
log "users need this in their environment (or the default /etc/slurm/slurm.conf):"
env_line

#!/usr/bin/env bash
# The Slurm runner against a real one-node cluster (pytest -m slurm tests/slurm).
#
# Installs Debian's slurm-wlm and munge when missing, writes a one-node slurm.conf for this
# machine (node = `hostname -s`, CPUs = nproc, RealMemory = 80% of the memory `free` reports),
# makes a munge key when there is none, starts munged, slurmctld and slurmd when they are not
# running, waits until `sinfo` shows the node idle, then runs the slurm-marked tests.
# Idempotent: a second run reuses the running daemons (reconfiguring them if the config
# changed). Needs root, as CI has. docs/runners.md ("## Slurm") explains the configuration.
#
#   VENV=/path/to/venv bash scripts/ci_slurm.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
JOBCOMP=/var/log/slurm/jobcomp.log

if ! command -v sbatch >/dev/null || ! command -v munged >/dev/null \
    || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    echo "ci_slurm: installing slurm-wlm and munge"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # Another apt-get may be running (CI installs docker and chromium too): wait for its lock.
    $SUDO apt-get update -qq -o DPkg::Lock::Timeout=600
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        slurm-wlm munge >/dev/null
fi
[ -x "$VENV/bin/python" ] || make install VENV="$VENV"

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.8)}')
# slurmctld resolves its own host name: make sure it can.
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
new_conf=$(cat <<EOF
# Written by scripts/ci_slurm.sh: a one-node cluster for the harness's slurm tests.
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# No slurmdbd here: no accounting database. Finished jobs are kept by slurmctld for
# MinJobAge seconds (scontrol/squeue still see them) and written to a job-completion file
# that \`sacct --completion\` reads; the runner's poller uses all three (docs/runners.md).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
MinJobAge=600
# The scheduler reacts fast: the tests are seconds long.
SchedulerParameters=sched_interval=2
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF"
    changed=1
fi

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key

running() { pgrep -x "$1" >/dev/null; }
running munged || su -s /bin/sh munge -c /usr/sbin/munged
if running slurmctld && [ "$changed" = 1 ]; then
    scontrol reconfigure
fi
running slurmctld || slurmctld
running slurmd || slurmd

# Wait for the node to be idle (a fresh slurmd registers within seconds; mix/alloc: it is
# up and already running someone's jobs, which is as good).
for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null || true)
    case "$state" in
        idle*|mix*|alloc*) break ;;
        down*|drain*|drng*)
            # A node left down by an earlier run of this script: return it to service.
            scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null || true)
if [[ "$state" != idle* && "$state" != mix* && "$state" != alloc* ]]; then
    echo "ci_slurm: node $host is not idle (state: ${state:-none}); logs in /var/log/slurm" >&2
    sinfo -R >&2 || true
    exit 1
fi
sinfo
# This -m replaces the default one in pyproject's addopts (the last -m wins).
"$VENV/bin/python" -m pytest -q -m slurm tests/slurm "$@"

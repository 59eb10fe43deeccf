#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the `slurm` test tier (tests/slurm/) and for trying the launch
# scripts by hand: Debian's Slurm (22.05 on bookworm) with munged, slurmctld and one or two slurmd started by
# hand, no systemd, every file under one directory.
#
#   sudo tools/slurm_cluster.sh up DIR [--nodes 1|2] [--kill-wait S] [--grace S] [--port P]
#   export SLURM_CONF=DIR/slurm.conf      # then sbatch / squeue / scontrol / scancel talk to it
#   sudo tools/slurm_cluster.sh down DIR  # stops the daemons it started, by the pids in DIR/pids
#
# Needs root (slurmd runs jobs as their user) and, when the packages are missing, apt: it installs
# slurmctld, slurmd, slurm-client and munge (`apt-get update` once, no recommends) with a policy-rc.d that
# keeps their init scripts from starting daemons. Exit status 3 means "cannot run here" (not root, no apt,
# not Linux): the tests skip with the printed reason.
#
# Partitions (all on every node): `debug` (default), `low` (preemptable, PreemptMode=REQUEUE, no grace),
# `lowgrace` (the same with GraceTime=--grace, default 20 s) and `high` (preempts both). KillWait (the time
# between SIGTERM and SIGKILL on scancel, the time limit, requeue and preemption without grace) is
# --kill-wait (default 15 s; Slurm's default is 30). A requeued job may restart after 10 s (cred_expire).
# Ports: slurmctld on --port (default 16817), the slurmds on the next one or two.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR [--nodes 1|2] [--kill-wait S] [--grace S] [--port P]" >&2; exit 2; }
cannot() { echo "slurm_cluster: cannot run here: $*" >&2; exit 3; }

[[ $# -ge 2 ]] || usage
ACTION=$1 DIR=$2
shift 2
NODES=1 KILL_WAIT=15 GRACE=20 PORT=16817
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=$2; shift 2 ;;
        --kill-wait) KILL_WAIT=$2; shift 2 ;;
        --grace) GRACE=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;  # slurmctld's; the slurmds take the next ones
        *) usage ;;
    esac
done
[[ $NODES == 1 || $NODES == 2 ]] || { echo "slurm_cluster: --nodes must be 1 or 2, got $NODES" >&2; exit 2; }

stop_pid_file() {  # TERM the daemon whose pid is in $1, KILL it after 10 s; only that pid
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [[ $ACTION == down ]]; then
    [[ -d $DIR/pids ]] || exit 0
    for f in "$DIR"/pids/slurmd-*.pid; do [[ -e $f ]] && stop_pid_file "$f"; done
    stop_pid_file "$DIR/pids/slurmctld.pid"
    stop_pid_file "$DIR/pids/munged.pid"
    exit 0
fi
[[ $ACTION == up ]] || usage

[[ $(uname -s) == Linux ]] || cannot "not Linux"
[[ $(id -u) == 0 ]] || cannot "not root (slurmd must run as root to start jobs)"

install_packages() {
    command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munged are not installed and there is no apt-get"
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [[ -e $policy ]] && had_policy=1
    if [[ $had_policy == 0 ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >"$DIR/apt.log" 2>&1 || rc=$?
    [[ $had_policy == 0 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || cannot "apt-get install of slurmctld slurmd slurm-client munge failed (see $DIR/apt.log)"
}

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    install_packages
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
mkdir -p "$DIR"/{pids,log,state,spool,munge}
chmod 700 "$DIR/munge"

# munged with its own key, socket and pid under DIR (not the system's /etc/munge, /run/munge)
if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
fi
SOCKET=$DIR/munge/munge.socket
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/pids/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" \
    || cannot "munged did not start (see $DIR/log/munged.log)"

node_names=("$HOST")
[[ $NODES == 2 ]] && node_names+=(localhost)
{
    echo "ClusterName=rencetest"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$SOCKET,cred_expire=10"
    echo "CredType=cred/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SlurmdParameters=config_overrides"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/pids/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/pids/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "ReturnToService=2"
    echo "KillWait=$KILL_WAIT"
    echo "MinJobAge=3600"
    echo "MessageTimeout=20"
    echo "SchedulerParameters=defer_batch"
    echo "SchedulerType=sched/backfill"
    echo "JobRequeue=1"
    echo "MpiDefault=none"
    echo "PreemptType=preempt/partition_prio"
    echo "PreemptMode=REQUEUE"
    port=$((PORT + 1))
    for n in "${node_names[@]}"; do
        echo "NodeName=$n NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
        port=$((port + 1))
    done
    all=$(IFS=,; echo "${node_names[*]}")
    echo "PartitionName=debug Nodes=$all Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF"
    echo "PartitionName=low Nodes=$all MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=0"
    echo "PartitionName=lowgrace Nodes=$all MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE"
    echo "PartitionName=high Nodes=$all MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"
} > "$DIR/slurm.conf"
export SLURM_CONF=$DIR/slurm.conf

slurmctld -i -f "$SLURM_CONF" || { "$0" down "$DIR"; cannot "slurmctld did not start (see $DIR/log/slurmctld.log)"; }
for n in "${node_names[@]}"; do
    mkdir -p "$DIR/spool/$n"
    slurmd -f "$SLURM_CONF" -N "$n" || { "$0" down "$DIR"; cannot "slurmd -N $n did not start (see $DIR/log/)"; }
done

for _ in $(seq 150); do  # up to 30 s for every node to register
    idle=$(sinfo -h -p debug -t idle -o '%D' 2>/dev/null || true)
    [[ ${idle:-0} -ge $NODES ]] && { echo "slurm_cluster: $NODES node(s) idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.2
done
sinfo -N -l >&2 || true
"$0" down "$DIR"
cannot "the node(s) did not become idle in 30 s (see $DIR/log/)"

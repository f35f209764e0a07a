#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (as root), for trying slurm/train.sbatch and for the
# tests marked `slurm`. Needs Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
#   bash slurm/local_cluster.sh          start (idempotent): writes the config, starts munge and the daemons
#   bash slurm/local_cluster.sh stop     stop the daemons
#   bash slurm/local_cluster.sh conf     write the config and start munge only: the caller starts the daemons
# SLURM_CONF: where the config goes (/etc/slurm/slurm.conf); SLURM_LOCAL_STATE: the daemons' state, spool, pid and
# log files (/var/tmp/rag-lightning-slurm); SLURM_LOCAL_NODES: the nodes, "NAME=ADDRESS ..." with the controller's
# first (this host: the multi-node tests give two hosts of network namespaces, each running its own slurmd).
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/rag-lightning-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
host=$(hostname -s)
read -ra NODES <<< "${SLURM_LOCAL_NODES:-$host=}"

# this cluster's daemons by their pid files: other SLURM daemons on the machine (the multi-node tests start some in
# network namespaces of their own) are not this cluster's. A pid file outlives its daemon, and its pid may since name
# another process or a thread (`kill -0` accepts a thread's id): it counts only if that is a process of the daemon's
# name (slurmctld; slurmd for slurmd-HOST).
running() { [[ -s $STATE/$1.pid ]] && pgrep -F "$STATE/$1.pid" -x "${1%%-*}" >/dev/null; }

if [[ "${1:-start}" == stop ]]; then
    for daemon in "slurmd-$host" slurmctld; do
        if running "$daemon"; then kill "$(cat "$STATE/$daemon.pid")"; fi
    done
    exit 0
fi
if [[ $(id -u) != 0 ]]; then echo "local_cluster.sh: run as root" >&2; exit 1; fi
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null || { echo "local_cluster.sh: $bin not found; apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
done

cpus=$(nproc --all)      # not `nproc`: it follows OMP_NUM_THREADS, which the tests set to 1
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
controller=${NODES[0]%%=*} controller_address=${NODES[0]#*=}
mkdir -p "$(dirname "$CONF")" "$STATE/ctld" /run/munge
{
    cat <<CONF
ClusterName=local
SlurmctldHost=$controller${controller_address:+($controller_address)}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SchedulerType=sched/backfill
MpiDefault=none
CONF
    names=()
    for node in "${NODES[@]}"; do
        name=${node%%=*} address=${node#*=}
        names+=("$name")
        mkdir -p "$STATE/$name"
        echo "NodeName=$name${address:+ NodeAddr=$address} CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
} > "$CONF"

# one caller at a time (tests on two pytest workers may both get here); -o: munged does not inherit the lock
flock -o /run/munge/.local_cluster.lock sh -c '[ -s /etc/munge/munge.key ] || mungekey -c
    pgrep -x munged >/dev/null || munged --force'
if [[ "${1:-start}" == conf ]]; then exit 0; fi

running slurmctld || slurmctld
running "slurmd-$host" || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then echo "SLURM node $host idle"; exit 0; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "local_cluster.sh: the node did not become idle; see $STATE/*.log" >&2
sinfo >&2 || true
exit 1

#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (as root), for trying slurm/train.sbatch and for the
# tests marked `slurm`. Needs Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
#   bash slurm/local_cluster.sh          start (idempotent): writes /etc/slurm/slurm.conf, starts the daemons
#   bash slurm/local_cluster.sh stop     stop the daemons
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/rag-lightning-slurm}

# this cluster's daemons by their pid files: other SLURM daemons on the machine (the multi-node tests start some in
# network namespaces of their own) are not this cluster's
running() { [[ -s $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

if [[ "${1:-start}" == stop ]]; then
    for daemon in slurmd slurmctld; do
        if running $daemon; then kill "$(cat "$STATE/$daemon.pid")"; fi
    done
    exit 0
fi
if [[ $(id -u) != 0 ]]; then echo "local_cluster.sh: run as root" >&2; exit 1; fi
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null || { echo "local_cluster.sh: $bin not found; apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
done

host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

[[ -s /etc/munge/munge.key ]] || mungekey -c
pgrep -x munged >/dev/null || munged --force
running slurmctld || slurmctld
running slurmd || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then echo "SLURM node $host idle"; exit 0; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "local_cluster.sh: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
